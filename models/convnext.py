"""ConvNeXt: "A ConvNet for the 2020s" (Liu et al., arXiv 2201.03545).

Four stages of residual blocks (depthwise 7x7 conv -> LayerNorm -> Linear 4x -> GELU -> Linear, with
layer scale), a patchify stem (4x4 conv, stride 4) and 2x2 stride-2 downsampling between stages.
State-dict keys follow facebookresearch/ConvNeXt, so its released checkpoints load unchanged.
The backbone (stem, downsampling, stages, pooled norm, head) is shared with ConvNeXt V2.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from models.layers import DropPath, LayerNorm
from models.registry import register_model


class Block(nn.Module):
    """ConvNeXt block: x + drop_path(gamma * MLP(LN(dwconv(x)))), x in (N, C, H, W)."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)  # 1x1 convs as Linear on channels-last rows
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = (nn.Parameter(layer_scale_init_value * torch.ones(dim))
                      if layer_scale_init_value > 0 else None)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        if self.gamma is not None:
            x = self.gamma * x
        return shortcut + self.drop_path(x.permute(0, 3, 1, 2))  # (N, C, H, W)


class ConvNeXt(nn.Module):
    """The ConvNeXt backbone + classifier; `block` builds one block (dim, drop_path) -> nn.Module."""

    def __init__(self, block: Callable[[int, float], nn.Module], in_chans: int = 3, num_classes: int = 1000,
                 depths: Sequence[int] = (3, 3, 9, 3), dims: Sequence[int] = (96, 192, 384, 768),
                 drop_path_rate: float = 0.0, head_init_scale: float = 1.0):
        super().__init__()
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
            LayerNorm(dims[0], eps=1e-6, data_format="channels_first"))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm(dims[i], eps=1e-6, data_format="channels_first"),
                nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        n = sum(depths)  # stochastic depth grows linearly with block index
        rates = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            self.stages.append(nn.Sequential(*(block(dims[i], rates[first + j]) for j in range(depth))))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        if num_classes > 0:
            self.head.weight.data.mul_(head_init_scale)
            self.head.bias.data.mul_(head_init_scale)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> pooled, normalised features (N, dims[-1])."""
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.norm(x.mean(dim=(-2, -1)))  # global average pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


VARIANTS = {  # Table/Sec. 3 of the paper (T/S/B/L) and the official repo (XL)
    "tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    "small": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
    "base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
    "large": dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)),
    "xlarge": dict(depths=(3, 3, 27, 3), dims=(256, 512, 1024, 2048)),
}


def convnext(size: str, layer_scale_init_value: float = 1e-6, **overrides) -> ConvNeXt:
    def block(dim, dp):
        return Block(dim, dp, layer_scale_init_value)
    return ConvNeXt(block, **{**VARIANTS[size], **overrides})


@register_model
def convnext_tiny(**kw): return convnext("tiny", **kw)
@register_model
def convnext_small(**kw): return convnext("small", **kw)
@register_model
def convnext_base(**kw): return convnext("base", **kw)
@register_model
def convnext_large(**kw): return convnext("large", **kw)
@register_model
def convnext_xlarge(**kw): return convnext("xlarge", **kw)
