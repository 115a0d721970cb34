"""CLIP (Radford et al., arXiv 2103.00020) and SLIP (Mu et al., arXiv 2112.12750) on the engine.

Layout and keys follow facebookresearch/SLIP: `visual` is the timm-layout ViT of models/vit.py
(learned positions, no head), `image_projection` / `text_projection` are bias-free projection
matrices to the joint space, and the text tower is OpenAI's (`token_embedding`, `positional_embedding`,
`transformer.resblocks.i.{ln_1, attn.in_proj_weight/in_proj_bias/out_proj, ln_2, mlp.c_fc/c_proj}`,
`ln_final`, `logit_scale`: models/clip_text.py). Text attention is causal through kfe::attention; pooling takes the end-of-text token.
The text tower takes any tokenizer's ids: vocabulary size, context length and the EOT id are config.
SLIP adds a SimCLR head on the vision features (`image_mlp`, Sec. 3 of the SLIP paper).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from models.clip_text import ImageTextModel, QuickGELU  # noqa: F401  (QuickGELU: re-exported)
from models.registry import register_model
from models.vit import VARIANTS as VIT_VARIANTS, VisionTransformer


class CLIP(ImageTextModel):
    def __init__(self, embed_dim: int = 512, vision: dict | None = None, img_size: int = 224,
                 context_length: int = 77, vocab_size: int = 49408, transformer_width: int = 512,
                 transformer_heads: int = 8, transformer_layers: int = 12, eot_token_id: int | None = None,
                 init_temperature: float = 0.07):
        vision = {**VIT_VARIANTS["base"], "patch_size": 16, **(vision or {})}
        super().__init__(lambda: VisionTransformer(img_size=img_size, num_classes=0, pos_embed="learned", **vision),
                         embed_dim, context_length, vocab_size, transformer_width, transformer_heads,
                         transformer_layers, eot_token_id, init_temperature)
        self.vision_width = self.visual.embed_dim
        self.image_projection = nn.Parameter(torch.empty(self.vision_width, embed_dim))
        if self.text_projection.device.type != "meta":
            self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """SLIP/OpenAI init: depth-scaled normals for the text tower, width^-1/2 for the projections."""
        self.init_text_tower()
        nn.init.normal_(self.image_projection, std=self.vision_width ** -0.5)

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> pooled vision features (B, vision_width): the normalised cls token."""
        return self.visual.forward_features(image)[:, 0]

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_features(image) @ self.image_projection


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
            # One view at a time, as SLIP's models.py: in training the head's BatchNorm takes each view's
            # own batch statistics (and updates its running statistics twice), not the two views' pooled.
            out["aug1_embed"] = self.image_mlp(self.image_features(aug1))
            out["aug2_embed"] = self.image_mlp(self.image_features(aug2))
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
