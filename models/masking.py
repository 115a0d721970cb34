"""Block-wise masking (BEiT, Bao et al., arXiv 2106.08254, Sec. 2.5 / Algorithm 1) and its space-time
extension for video (MaskFeat, Wei et al., arXiv 2112.09133: "cube" masking).

Algorithm 1 of BEiT, per image on an h x w token grid with a budget of N_m = round(ratio * L) tokens:

    repeat
        s ~ U(16, N_m - |M|)                 block area in tokens (at least 16)
        r ~ U(0.3, 1/0.3)                    aspect ratio (log-uniform in the official code)
        a, b = sqrt(s r), sqrt(s / r)        block height and width (rounded)
        t ~ U(0, h - a), l ~ U(0, w - b)     top-left corner
        M = M + block
    until |M| >= N_m

As in the official implementation, a block is only accepted if it adds between 1 and N_m - |M| new
tokens (so the mask never exceeds the budget), each block gets up to 10 draws, and masking stops when
none of them fits (so the count can end a few tokens short of N_m). Two deliberate differences make
it usable on small grids (e.g. 4 x 4 tokens of a 64-px image): the minimum area is min(16, budget
left), and a block may span the full grid side (the official code requires a < h, b < w).

Video (MaskFeat's default "cube" masking, SlowFast's MaskingGenerator3D): tokens form a (t, h, w)
grid; each block is a spatial rectangle as above extended over a random number of consecutive token
frames (uniform in 1..t, random start). To keep Algorithm 1's "area <= budget left" rule in 3-D, the
temporal extent is drawn first and the spatial area is bounded by (budget left) / extent. `tube=True`
instead extends every block over all frames ("tube" masking: the same spatial mask on every frame).

All randomness comes from a torch.Generator, drawn in fixed-size chunks, so a mask is a pure function
of the generator's seed. The loop runs on the CPU in Python (~0.1 ms per 14 x 14 image here); masks
are then moved to the model's device.
"""
from __future__ import annotations

import math

import numpy as np
import torch

TRIES_PER_BLOCK = 10  # BEiT's official generator draws up to 10 candidate blocks before giving up
_CHUNK = 256          # uniforms are drawn from the generator in chunks of this many attempts


class _Uniforms:
    """Rows of 6 uniforms in [0, 1) drawn lazily, in fixed chunks, from a torch.Generator."""

    def __init__(self, generator: torch.Generator | None):
        self.generator, self.rows, self.i = generator, [], 0

    def next(self) -> list[float]:
        if self.i == len(self.rows):
            self.rows, self.i = torch.rand(_CHUNK, 6, generator=self.generator, dtype=torch.float64).tolist(), 0
        self.i += 1
        return self.rows[self.i - 1]


def _one_mask(grid: tuple[int, int, int], budget: int, min_area: float, max_area: float, tube: bool,
              log_aspect: tuple[float, float], draw: _Uniforms) -> tuple[np.ndarray, list[tuple]]:
    """(t, h, w) bool mask with at most `budget` True, and the blocks (front, top, left, dt, bh, bw) placed."""
    T, H, W = grid
    mask = np.zeros(grid, dtype=bool)
    blocks, count = [], 0
    while count < budget:
        left_over = budget - count
        placed = False
        for _ in range(TRIES_PER_BLOCK):
            u = draw.next()
            dt = T if tube else 1 + min(int(u[0] * T), T - 1)             # temporal extent in 1..T
            hi = min(max_area, left_over / dt)                            # spatial area bound
            if hi < 1:
                continue
            lo = min(min_area, hi / 2)                                    # 16, less near the end
            area = lo + u[1] * (hi - lo)                                  # U(lo, hi)
            aspect = math.exp(log_aspect[0] + u[2] * (log_aspect[1] - log_aspect[0]))
            bh, bw = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (1 <= bh <= H and 1 <= bw <= W):
                continue
            top, left = int(u[3] * (H - bh + 1)), int(u[4] * (W - bw + 1))
            front = 0 if tube else int(u[5] * (T - dt + 1))
            block = mask[front:front + dt, top:top + bh, left:left + bw]
            new = block.size - int(block.sum())
            if 0 < new <= left_over:
                block[...] = True
                blocks.append((front, top, left, dt, bh, bw))
                count += new
                placed = True
                break
        if not placed:
            break
    return mask, blocks


def block_mask(batch: int, grid: tuple[int, ...], ratio: float, *, generator: torch.Generator | None = None,
               min_patches: int = 16, max_patches: int | None = None, min_aspect: float = 0.3,
               tube: bool = False, device: torch.device | str | None = None,
               return_blocks: bool = False):
    """Block-wise masks for a batch: bool (batch, L) with True = masked, tokens in row-major order
    (frames outer for a (t, h, w) grid, as the model's patch embedding and hog_targets number them).

    Args:
        grid: (h, w) for images or (t, h, w) token grid for video.
        ratio: fraction of tokens to mask; the budget is round(ratio * L) tokens per sample.
        min_patches: smallest block area in tokens (16 as BEiT); clamped to the budget left.
        max_patches: largest spatial block area (default: the budget for images, h * w for video).
        min_aspect: aspect ratios are log-uniform in [min_aspect, 1 / min_aspect].
        tube: video only: every block spans all token frames.
        return_blocks: also return, per sample, the blocks placed as (front, top, left, dt, bh, bw).
    """
    grid3 = tuple(grid) if len(grid) == 3 else (1, *grid)
    if len(grid3) != 3 or min(grid3) < 1:
        raise ValueError(f"grid must be (h, w) or (t, h, w) positive token counts, got {tuple(grid)}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    if not 0.0 < min_aspect <= 1.0:
        raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
    T, H, W = grid3
    L = T * H * W
    budget = int(round(ratio * L))
    max_area = max_patches if max_patches is not None else (budget if T == 1 else H * W)
    log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
    draw = _Uniforms(generator)
    masks, all_blocks = np.zeros((batch, L), dtype=bool), []
    for b in range(batch):
        m, blocks = _one_mask(grid3, budget, float(min_patches), float(max_area), tube, log_aspect, draw)
        masks[b] = m.reshape(L)  # (t, h, w) -> L, frames outer, rows, columns
        all_blocks.append(blocks)
    out = torch.from_numpy(masks).to(device) if device is not None else torch.from_numpy(masks)
    return (out, all_blocks) if return_blocks else out
