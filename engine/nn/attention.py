"""Multi-head self-attention (ViT, arXiv 2010.11929; MAE 2111.06377; DiT 2212.09748) on kfe::attention."""
from __future__ import annotations

import torch
from torch import nn

from engine.ops import _checks, attention


class Attention(nn.Module):
    """Self-attention over tokens x (B, N, dim): one packed qkv projection, kfe::attention, proj.

    Submodules `qkv` (Linear dim -> 3*dim) and `proj` (Linear dim -> dim) carry the key names of the
    official MAE / timm ViT / DiT checkpoints (`qkv.weight`, `qkv.bias`, `proj.weight`, `proj.bias`),
    which load unchanged. q, k and v are strided views of the qkv output (no copies).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        _checks.tensor("x", x, ndim=3, dtypes=None, layout="(B, N, dim)")
        B, N, C = x.shape
        if C != self.dim:
            raise ValueError(f"x must be (B, N, dim) with dim = {self.dim}, got shape {tuple(x.shape)}")
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
        q, k, v = qkv.unbind(0)
        out = attention(q, k, v, causal=causal)  # (B, H, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"
