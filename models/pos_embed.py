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


def resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int], extra: int = 1) -> torch.Tensor:
    """A (1, extra + h*w, D) position table for a new (gh, gw) patch grid: the `extra` leading (cls) rows
    kept, the grid bicubically resized (MAE's util/pos_embed.py interpolate_pos_embed, for fine-tuning
    at another resolution). The old grid must be square."""
    import math

    import torch.nn.functional as F

    n = pos.shape[1] - extra
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"pos_embed has {n} grid positions, not a square grid")
    if (side, side) == tuple(grid):
        return pos
    head, table = pos[:, :extra], pos[:, extra:]
    D = table.shape[-1]
    table = table.reshape(1, side, side, D).permute(0, 3, 1, 2).float()
    table = F.interpolate(table, size=tuple(grid), mode="bicubic", align_corners=False)
    table = table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], D).to(pos.dtype)
    return torch.cat([head, table], dim=1)
