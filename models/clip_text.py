"""OpenAI CLIP's transformer blocks and the text tower shared by both CLIP layouts (models/clip.py: SLIP's;
models/openai_clip.py: OpenAI / open_clip / MetaCLIP's).

Keys are OpenAI's (`transformer.resblocks.i.{ln_1, attn.in_proj_weight/in_proj_bias/out_proj, ln_2,
mlp.c_fc/c_proj}`, `token_embedding`, `positional_embedding`, `ln_final`, `text_projection`, `logit_scale`),
so OpenAI, open_clip, MetaCLIP and SLIP checkpoints load unchanged. Attention runs through kfe::attention
(causal in the text tower); pooling takes the end-of-text token. The temperature `logit_scale` is a
parameter of the model (as every official CLIP), clamped as engine.nn.ContrastiveLoss documents, and
the loss is kfe::contrastive_loss.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import engine


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): OpenAI CLIP's activation (MetaCLIP's and open_clip's `*-quickgelu` models)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class MultiheadAttention(nn.Module):
    """Self-attention with nn.MultiheadAttention's parameter names (OpenAI CLIP keys), on kfe::attention."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width ({dim}) must be divisible by heads ({num_heads})")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)  # (in_proj_weight is initialised by the model that owns it)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)  # (B, h, N, d)
        out = engine.ops.attention(q, k, v, causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, C))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = True,
                 causal: bool = False):
        super().__init__()
        hidden = int(width * mlp_ratio)  # open_clip: int(d_model * mlp_ratio) (bigG: 1664 * 4.9231 -> 8192)
        self.causal = causal
        self.ln_1 = nn.LayerNorm(width)
        self.attn = MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, hidden),
                                             gelu=QuickGELU() if quick_gelu else nn.GELU(),
                                             c_proj=nn.Linear(hidden, width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=self.causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = True,
                 causal: bool = False):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu, causal)
                                       for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


def _accept_old_logit_scale(state_dict, prefix, *args) -> None:
    """KFE checkpoints before the official key kept the temperature at `contrastive.logit_scale`."""
    old = prefix + "contrastive.logit_scale"
    if old in state_dict:
        state_dict[prefix + "logit_scale"] = state_dict.pop(old)


class ImageTextModel(nn.Module):
    """The text tower, temperature and loss of CLIP; `visual()` builds the vision tower, and subclasses
    define `image_features` / `encode_image`. The text tower takes any tokenizer's ids: vocabulary size, context length and the
    EOT id are config (eot_token_id None: the EOT is the largest id, OpenAI's argmax pooling)."""

    def __init__(self, visual: Callable[[], nn.Module], embed_dim: int, context_length: int = 77,
                 vocab_size: int = 49408, transformer_width: int = 512, transformer_heads: int = 8,
                 transformer_layers: int = 12, eot_token_id: int | None = None, init_temperature: float = 0.07,
                 quick_gelu: bool = True, max_scale: float = 100.0):
        super().__init__()
        self.visual = visual()  # built first: the vision tower's init draws first from the RNG
        self.context_length, self.vocab_size, self.eot_token_id = context_length, vocab_size, eot_token_id
        self.max_scale = max_scale
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads,
                                       quick_gelu=quick_gelu, causal=True)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = nn.LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self._register_load_state_dict_pre_hook(_accept_old_logit_scale)

    def init_text_tower(self) -> None:
        """OpenAI's init: depth-scaled normals for the text tower, width^-1/2 for its projection."""
        width, layers = self.transformer.width, self.transformer.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std, attn_std, fc_std = width ** -0.5 * (2 * layers) ** -0.5, width ** -0.5, (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

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

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) after clamping the parameter in place to [0, log max_scale] (see
        engine.nn.ContrastiveLoss: the parameter keeps its true gradient)."""
        with torch.no_grad():
            self.logit_scale.clamp_(0, math.log(self.max_scale))
        return self.logit_scale.exp()

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image_embed": F.normalize(self.encode_image(image), dim=-1),
                "text_embed": F.normalize(self.encode_text(text), dim=-1),
                "logit_scale": self.scale()}

    def clip_loss(self, out: dict[str, torch.Tensor], group=None) -> torch.Tensor:
        """kfe::contrastive_loss of forward()'s embeddings (all-gathered across `group` when distributed)."""
        return engine.ops.contrastive_loss(out["image_embed"], out["text_embed"], out["logit_scale"],
                                           kind="clip", group=group)
