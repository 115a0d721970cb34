"""CLIP (Radford et al., arXiv 2103.00020) and SLIP (Mu et al., arXiv 2112.12750) on the engine.

Layout and keys follow facebookresearch/SLIP: `visual` is the timm-layout ViT of models/vit.py
(learned positions, no head), `image_projection` / `text_projection` are bias-free projection
matrices to the joint space, and the text tower is OpenAI's (`token_embedding`, `positional_embedding`,
`transformer.resblocks.i.{ln_1, attn.in_proj_weight/in_proj_bias/out_proj, ln_2, mlp.c_fc/c_proj}`,
`ln_final`). Text attention is causal through kfe::attention; pooling takes the end-of-text token.
The text tower takes any tokenizer's ids: vocabulary size, context length and the EOT id are config.
SLIP adds a SimCLR head on the vision features (`image_mlp`, Sec. 3 of the SLIP paper).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

import engine
from engine.nn import ContrastiveLoss
from models.registry import register_model
from models.vit import VARIANTS as VIT_VARIANTS, VisionTransformer


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class TextAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (OpenAI CLIP keys)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, causal: bool = True) -> torch.Tensor:
        B, N, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)  # (B, h, N, d)
        out = engine.ops.attention(q, k, v, causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, C))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = TextAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=True)
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class CLIP(nn.Module):
    def __init__(self, embed_dim: int = 512, vision: dict | None = None, img_size: int = 224,
                 context_length: int = 77, vocab_size: int = 49408, transformer_width: int = 512,
                 transformer_heads: int = 8, transformer_layers: int = 12, eot_token_id: int | None = None,
                 init_temperature: float = 0.07):
        super().__init__()
        vision = {**VIT_VARIANTS["base"], "patch_size": 16, **(vision or {})}
        self.visual = VisionTransformer(img_size=img_size, num_classes=0, pos_embed="learned", **vision)
        self.vision_width = self.visual.embed_dim
        self.context_length, self.vocab_size, self.eot_token_id = context_length, vocab_size, eot_token_id
        self.transformer = TextTransformer(transformer_width, transformer_layers, transformer_heads)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = nn.LayerNorm(transformer_width)
        self.image_projection = nn.Parameter(torch.empty(self.vision_width, embed_dim))
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        # The learnable temperature lives in the engine's loss (init 0.07, scale capped at 100).
        self.contrastive = ContrastiveLoss("clip", init_temperature=init_temperature, max_scale=100.0)
        self._register_load_state_dict_pre_hook(_accept_slip_logit_scale)
        if self.text_projection.device.type != "meta":
            self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """SLIP/OpenAI init: depth-scaled normals for the text tower, width^-1/2 for the projections."""
        width, layers = self.transformer.width, self.transformer.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std, attn_std, fc_std = width ** -0.5 * (2 * layers) ** -0.5, width ** -0.5, (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.image_projection, std=self.vision_width ** -0.5)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> pooled vision features (B, vision_width): the normalised cls token."""
        return self.visual.forward_features(image)[:, 0]

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_features(image) @ self.image_projection

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """(B, N <= context_length) token ids -> (B, embed_dim), pooled at the end-of-text token."""
        return self.text_features(text) @ self.text_projection

    def text_features(self, text: torch.Tensor) -> torch.Tensor:
        """(B, N) token ids -> the text tower's pooled features (B, transformer_width), before the
        projection (what CiT scores pool texts with)."""
        if text.shape[1] > self.context_length:
            raise ValueError(f"text has {text.shape[1]} tokens; the context length is {self.context_length}")
        if not torch.compiler.is_compiling():  # value checks sync and would break a compiled graph: eager only
            self.check_token_ids(text)
        x = self.token_embedding(text) + self.positional_embedding[: text.shape[1]]  # (B, N, W)
        x = self.ln_final(self.transformer(x))
        # OpenAI's tokenizer gives EOT the largest id (argmax); other tokenizers name theirs.
        eot = text.argmax(dim=-1) if self.eot_token_id is None else (text == self.eot_token_id).int().argmax(-1)
        return x[torch.arange(x.shape[0], device=x.device), eot]

    def check_token_ids(self, text: torch.Tensor) -> None:
        """ValueError for ids outside [0, vocab_size) and, when eot_token_id is set, rows without it
        (argmax over no match would silently pool position 0)."""
        if text.dtype.is_floating_point or text.dtype == torch.bool:
            raise TypeError(f"text must hold integer token ids, got {text.dtype}")
        if text.numel() == 0 or text.device.type == "meta":  # meta (FLOP counting): no values to check
            return
        lo, hi = torch.aminmax(text)
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"text holds token ids in [{int(lo)}, {int(hi)}]; the vocabulary is "
                             f"[0, {self.vocab_size}) (vocab_size)")
        if self.eot_token_id is not None:
            missing = (~(text == self.eot_token_id).any(dim=-1)).nonzero().flatten()
            if missing.numel():
                raise ValueError(f"text rows {missing[:8].tolist()} have no end-of-text token "
                                 f"(eot_token_id={self.eot_token_id}) to pool at")

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image_embed": F.normalize(self.encode_image(image), dim=-1),
                "text_embed": F.normalize(self.encode_text(text), dim=-1),
                "logit_scale": self.contrastive.scale()}

    def clip_loss(self, out: dict[str, torch.Tensor], group=None) -> torch.Tensor:
        """kfe::contrastive_loss of forward()'s embeddings (all-gathered across `group` when distributed)."""
        return self.contrastive(out["image_embed"], out["text_embed"], group=group)


def _accept_slip_logit_scale(state_dict, prefix, *args) -> None:
    """SLIP/OpenAI checkpoints keep the temperature at `logit_scale`; here it is `contrastive.logit_scale`."""
    old = prefix + "logit_scale"
    if old in state_dict:
        state_dict[prefix + "contrastive.logit_scale"] = state_dict.pop(old)


class SLIP(CLIP):
    """CLIP + SimCLR on two augmented views of the image (SLIP Sec. 3): a 3-layer MLP head on the
    vision features (vision width -> 4096 -> 4096 -> 256, BatchNorm + ReLU)."""

    def __init__(self, ssl_mlp_dim: int = 4096, ssl_emb_dim: int = 256, **kw):
        super().__init__(**kw)
        self.image_mlp = nn.Sequential(OrderedDict(
            layer1=nn.Linear(self.vision_width, ssl_mlp_dim), bn1=nn.BatchNorm1d(ssl_mlp_dim), relu1=nn.ReLU(True),
            layer2=nn.Linear(ssl_mlp_dim, ssl_mlp_dim), bn2=nn.BatchNorm1d(ssl_mlp_dim), relu2=nn.ReLU(True),
            layer3=nn.Linear(ssl_mlp_dim, ssl_emb_dim)))

    def forward(self, image: torch.Tensor, text: torch.Tensor, aug1: torch.Tensor | None = None,
                aug2: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = super().forward(image, text)
        if aug1 is not None and aug2 is not None:
            views = self.image_mlp(self.image_features(torch.cat([aug1, aug2])))
            out["aug1_embed"], out["aug2_embed"] = views.chunk(2)
        return out


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's NT-Xent loss for two views (B, D) each: 2B-way classification of the positive pair."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)  # (2B, D)
    logits = z @ z.t() / temperature
    logits.fill_diagonal_(float("-inf"))  # a sample is not its own negative
    B = z1.shape[0]
    target = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B)]).to(z.device)
    return F.cross_entropy(logits, target)


# SLIP's vision towers (facebookresearch/SLIP models.py): ViT-S/16 is timm's `vit_small_mocov3_patch16_224`,
# width 384 with 12 heads of 32 (MoCo v3's ViT-S), not DeiT's 6; ViT-B/L are timm's base / large.
VISION = {**VIT_VARIANTS, "small": {**VIT_VARIANTS["small"], "num_heads": 12}}


def _register(kind: str, size: str) -> None:
    cls = CLIP if kind == "clip" else SLIP

    def build(**kw):
        vision = {**VISION[size], "patch_size": 16, **kw.pop("vision", {})}
        return cls(vision=vision, **kw)
    build.__name__ = f"{kind}_vit_{size}_patch16"
    register_model(build)


for _kind in ("clip", "slip"):
    for _size in ("small", "base", "large"):  # SLIP's ViT-S/B/L-16 models
        _register(_kind, _size)
