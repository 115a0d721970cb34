"""Fixed 2D sine-cosine position embeddings, as MAE (and DiT, which reuses MAE's code) build them."""
from __future__ import annotations

import torch


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): [sin(pos * w), cos(pos * w)], w = 10000^(-k / (dim/2))."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double().reshape(-1, 1) * omega  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid: int | tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """(gh*gw [+1], dim) in row-major patch order. The first half of the channels encodes the column
    index, the second half the row index (MAE's meshgrid(w, h) order); the cls position is zeros."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs dim divisible by 4, got {dim}")
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)  # (gh*gw, dim)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb])
    return emb.float()
