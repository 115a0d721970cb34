"""Vision Transformer (Dosovitskiy et al., arXiv 2010.11929) in the layout MAE and timm use.

Keys follow timm / facebookresearch/mae (`patch_embed.proj`, `cls_token`, `pos_embed`,
`blocks.i.norm1`, `blocks.i.attn.qkv`, `blocks.i.attn.proj`, `blocks.i.mlp.fc1/fc2`, `norm`, `head`),
so MAE-pretrained and timm checkpoints load unchanged. Attention is engine.nn.Attention (kfe::attention).
The position embedding is MAE's fixed 2D sin-cos table (a frozen parameter) unless pos_embed="learned".
global_pool=True is MAE's fine-tuning head (models_vit.py): the mean of the patch tokens through a
LayerNorm `fc_norm` (the final `norm` is then absent), instead of the normed cls token.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.nn import Attention
from models.layers import DropPath
from models.pos_embed import sincos_2d
from models.registry import register_model


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, L, D) tokens in row-major order, one per patch x patch tile."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, L, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, act: type[nn.Module] = nn.GELU, k_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, k_bias=k_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), causal=causal))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_transformer(module: nn.Module) -> None:
    """MAE's init: xavier-uniform Linear weights, zero biases, LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class VisionTransformer(nn.Module):
    """ViT. k_bias=False: attention with q and v biases but none on k (engine.nn.Attention)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path_rate: float = 0.0, pos_embed: str = "sincos",
                 k_bias: bool = True, global_pool: bool = False):
        super().__init__()
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        L = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, embed_dim), requires_grad=pos_embed == "learned")
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, r, k_bias=k_bias) for r in rates)
        self.global_pool = global_pool
        if global_pool:
            self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        else:
            self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init(pos_embed)

    def _init(self, pos_embed: str) -> None:
        if self.pos_embed.device.type == "meta":
            return
        with torch.no_grad():
            if pos_embed == "sincos":
                self.pos_embed.copy_(sincos_2d(self.embed_dim, self.patch_embed.grid, cls_token=True)[None])
            else:
                nn.init.trunc_normal_(self.pos_embed, std=0.02)
            w = self.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear on the flattened patch
            nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_transformer)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> patch tokens with position (B, L, D), without the cls token."""
        return self.patch_embed(x) + self.pos_embed[:, 1:]

    def with_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)  # (B, 1 + L, D)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 + L, D) normed tokens; with global_pool the pooled (B, D) feature through fc_norm."""
        x = self.with_cls(self.embed(x))
        for blk in self.blocks:
            x = blk(x)
        if self.global_pool:
            return self.fc_norm(x[:, 1:].mean(dim=1))
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.forward_features(x)
        return self.head(feats if self.global_pool else feats[:, 0])


VARIANTS = {  # ViT paper Table 1; ViT-S as in DeiT / timm
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}


def vit(size: str, patch: int, **overrides) -> VisionTransformer:
    return VisionTransformer(**{**VARIANTS[size], "patch_size": patch, **overrides})


@register_model
def vit_small_patch16(**kw): return vit("small", 16, **kw)
@register_model
def vit_small_patch14(**kw): return vit("small", 14, **kw)
@register_model
def vit_base_patch16(**kw): return vit("base", 16, **kw)
@register_model
def vit_base_patch14(**kw): return vit("base", 14, **kw)
@register_model
def vit_large_patch16(**kw): return vit("large", 16, **kw)
@register_model
def vit_large_patch14(**kw): return vit("large", 14, **kw)
@register_model
def vit_huge_patch16(**kw): return vit("huge", 16, **kw)
@register_model
def vit_huge_patch14(**kw): return vit("huge", 14, **kw)
