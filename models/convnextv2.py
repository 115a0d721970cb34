"""ConvNeXt V2: "Co-designing and Scaling ConvNets with Masked Autoencoders" (Woo et al., arXiv 2301.00808).

ConvNeXt with Global Response Normalization after the MLP expansion (Sec. 3.2; engine.nn.GRN, the
kfe::grn kernel) and no layer scale. Variants Atto..Huge from Table 8 / the official repo; keys
follow facebookresearch/ConvNeXt-V2, so its checkpoints load unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.nn import GRN
from models.convnext import ConvNeXt
from models.layers import DropPath, LayerNorm
from models.registry import register_model


class Block(nn.Module):
    """ConvNeXt V2 block: x + drop_path(pwconv2(GRN(GELU(pwconv1(LN(dwconv(x))))))), x in (N, C, H, W).
    grn=False removes GRN (the paper's ablation, Sec. 3.2 / Table 2a: FCMAE without GRN): no grn.* keys."""

    def __init__(self, dim: int, drop_path: float = 0.0, grn: bool = True):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim) if grn else nn.Identity()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        x = self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(x)))))
        return shortcut + self.drop_path(x.permute(0, 3, 1, 2))  # (N, C, H, W)


VARIANTS = {  # Table 8 of the paper
    "atto": dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320)),
    "femto": dict(depths=(2, 2, 6, 2), dims=(48, 96, 192, 384)),
    "pico": dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512)),
    "nano": dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640)),
    "tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    "base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
    "large": dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)),
    "huge": dict(depths=(3, 3, 27, 3), dims=(352, 704, 1408, 2816)),
}


def convnextv2(size: str, grn: bool = True, **overrides) -> ConvNeXt:
    """grn=False: every block without GRN (the ablation's encoder; load an FCMAE run pre-trained with grn=False)."""
    return ConvNeXt(lambda dim, dp: Block(dim, dp, grn), **{**VARIANTS[size], **overrides})


@register_model
def convnextv2_atto(**kw): return convnextv2("atto", **kw)
@register_model
def convnextv2_femto(**kw): return convnextv2("femto", **kw)
@register_model
def convnextv2_pico(**kw): return convnextv2("pico", **kw)
@register_model
def convnextv2_nano(**kw): return convnextv2("nano", **kw)
@register_model
def convnextv2_tiny(**kw): return convnextv2("tiny", **kw)
@register_model
def convnextv2_base(**kw): return convnextv2("base", **kw)
@register_model
def convnextv2_large(**kw): return convnextv2("large", **kw)
@register_model
def convnextv2_huge(**kw): return convnextv2("huge", **kw)
