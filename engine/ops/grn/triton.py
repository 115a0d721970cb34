"""kfe::grn in Triton: forward and backward, channels-last, optional per-sample visibility mask.

x is viewed as R = N*H*W rows of C channels. Each direction is three launches:

  reduce   (N, C-blocks, splits)  sums over H*W per (n, c): x^2, and for backward dy*x and dy
  stats    (N,)                   per sample: Gx = sqrt(sum x^2), D = mean_c Gx + eps and the
                                  per-channel coefficients of the elementwise pass
  apply    (R-blocks, C-blocks)   y = x*scale + beta, or dx = dy*scale + x*shift; 0 at masked rows

so memory traffic is the minimum for a two-pass algorithm: forward reads x twice and writes y;
backward reads x and dy twice and writes dx. All arithmetic is fp32. When N * C-blocks is too small
to fill the GPU, the H*W reduction is split and the stats kernel adds the partial sums, which keeps
the result deterministic (no atomics).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from engine.ops._target import gpu
from engine.ops import _alloc


@triton.jit
def _grn_reduce_kernel(
    x_ptr,     # (R, C) input rows, R = N * HW
    dy_ptr,    # (R, C) upstream gradient; read only when BACKWARD
    mask_ptr,  # (R,) uint8, nonzero = visible; read only when HAS_MASK
    part_ptr,  # (K, N, SPLIT, C) fp32 partial sums: K=1 [x^2], or K=3 [x^2, dy*x, dy] when BACKWARD
    N, HW, C, rows_per_split,
    HAS_MASK: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(2)
    col_ok = cols < C
    sq = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    gx = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    g = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, HW)
    for r0 in range(start, stop, BLOCK_R):
        hw = r0 + tl.arange(0, BLOCK_R)
        ok = hw < stop
        rows = n.to(tl.int64) * HW + hw
        if HAS_MASK:
            ok = ok & (tl.load(mask_ptr + rows, mask=ok, other=0) != 0)
        offs = rows[:, None] * C + cols[None, :]
        tile_ok = ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
        sq += x * x
        if BACKWARD:
            d = tl.load(dy_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
            gx += d * x
            g += d
    out = (n * tl.num_programs(2) + split) * C + cols
    tl.store(part_ptr + out, tl.sum(sq, axis=0), mask=col_ok)
    if BACKWARD:
        plane = N * tl.num_programs(2) * C
        tl.store(part_ptr + plane + out, tl.sum(gx, axis=0), mask=col_ok)
        tl.store(part_ptr + 2 * plane + out, tl.sum(g, axis=0), mask=col_ok)


@triton.jit
def _sum_splits(part_ptr, n, cols, ok, C, SPLIT):
    total = tl.load(part_ptr + n * SPLIT * C + cols, mask=ok, other=0.0)
    for s in range(1, SPLIT):
        total += tl.load(part_ptr + (n * SPLIT + s) * C + cols, mask=ok, other=0.0)
    return total


@triton.jit
def _grn_fwd_stats_kernel(
    part_ptr,   # (1, N, SPLIT, C) fp32 partial sums of x^2
    gamma_ptr,  # (C,) fp32
    scale_ptr,  # (N, C) fp32 out: 1 + gamma * Nx, so that y = x * scale + beta
    C, SPLIT, eps,
    BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0)
    total = tl.zeros([BLOCK_C], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        total += tl.sqrt(_sum_splits(part_ptr, n, cols, cols < C, C, SPLIT))
    denom = tl.sum(total, axis=0) / C + eps
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = cols < C
        gx = tl.sqrt(_sum_splits(part_ptr, n, cols, ok, C, SPLIT))
        gamma = tl.load(gamma_ptr + cols, mask=ok, other=0.0)
        tl.store(scale_ptr + n * C + cols, 1.0 + gamma * (gx / denom), mask=ok)


@triton.jit
def _grn_bwd_stats_kernel(
    part_ptr,    # (3, N, SPLIT, C) fp32 partial sums [x^2, dy*x, dy]
    gamma_ptr,   # (C,) fp32
    scale_ptr,   # (N, C) fp32 out: 1 + gamma * Nx            (dx = dy * scale + x * shift)
    shift_ptr,   # (N, C) fp32 out: dGx / Gx, 0 where Gx = 0  (torch.norm's subgradient)
    dparam_ptr,  # (2, N, C) fp32 out: per-sample dgamma and dbeta, summed over N afterwards
    N, C, SPLIT, eps,
    BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0)
    plane = N * SPLIT * C
    total = tl.zeros([BLOCK_C], tl.float32)
    cross = tl.zeros([BLOCK_C], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = cols < C
        gx = tl.sqrt(_sum_splits(part_ptr, n, cols, ok, C, SPLIT))
        s = _sum_splits(part_ptr + plane, n, cols, ok, C, SPLIT)
        gamma = tl.load(gamma_ptr + cols, mask=ok, other=0.0)
        total += gx
        cross += gamma * s * gx
    denom = tl.sum(total, axis=0) / C + eps
    cross_term = tl.sum(cross, axis=0) / (denom * denom * C)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = cols < C
        gx = tl.sqrt(_sum_splits(part_ptr, n, cols, ok, C, SPLIT))
        s = _sum_splits(part_ptr + plane, n, cols, ok, C, SPLIT)
        b = _sum_splits(part_ptr + 2 * plane, n, cols, ok, C, SPLIT)
        gamma = tl.load(gamma_ptr + cols, mask=ok, other=0.0)
        nx = gx / denom
        dgx = gamma * s / denom - cross_term
        shift = tl.where(gx > 0, dgx / tl.where(gx > 0, gx, 1.0), 0.0)
        tl.store(scale_ptr + n * C + cols, 1.0 + gamma * nx, mask=ok)
        tl.store(shift_ptr + n * C + cols, shift, mask=ok)
        tl.store(dparam_ptr + n * C + cols, s * nx, mask=ok)
        tl.store(dparam_ptr + N * C + n * C + cols, b, mask=ok)


@triton.jit
def _grn_apply_kernel(
    a_ptr,      # (R, C) forward: x; backward: dy
    x_ptr,      # (R, C) backward: x; unused in forward
    mask_ptr,   # (R,) uint8, nonzero = visible; read only when HAS_MASK
    scale_ptr,  # (N, C) fp32 per-sample scale of a
    shift_ptr,  # (N, C) fp32 per-sample scale of x (backward) | (C,) fp32 beta (forward)
    out_ptr,    # (R, C) y or dx, in the input dtype
    R, HW, C,
    HAS_MASK: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < R
    col_ok = cols < C
    visible = row_ok
    if HAS_MASK:
        visible = visible & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    read_ok = visible[:, None] & col_ok[None, :]
    offs = rows[:, None] * C + cols[None, :]
    table = (rows // HW)[:, None] * C + cols[None, :]
    a = tl.load(a_ptr + offs, mask=read_ok, other=0.0).to(tl.float32)
    out = a * tl.load(scale_ptr + table, mask=read_ok, other=0.0)
    if BACKWARD:
        x = tl.load(x_ptr + offs, mask=read_ok, other=0.0).to(tl.float32)
        out += x * tl.load(shift_ptr + table, mask=read_ok, other=0.0)
    else:
        out += tl.load(shift_ptr + cols, mask=col_ok, other=0.0)[None, :]
    out = tl.where(visible[:, None], out, 0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=tile_ok)


def _blocks(N: int, HW: int, C: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_C, split, rows_per_split). The interpreter wants few, large programs."""
    target = gpu(device)
    if target is None:
        return min(triton.next_power_of_2(HW), 256), min(triton.next_power_of_2(C), 512), 1, HW
    block_r, block_c = 32, min(triton.next_power_of_2(C), 128)
    programs = N * triton.cdiv(C, block_c)
    split = max(1, min(triton.cdiv(4 * target.sm_count, programs), triton.cdiv(HW, 4 * block_r)))
    rows = triton.cdiv(triton.cdiv(HW, split), block_r) * block_r
    return block_r, block_c, triton.cdiv(HW, rows), rows


def _prepare(x, gamma, mask):
    x = x.contiguous()
    N, H, W, C = x.shape
    gamma = gamma.reshape(C).float().contiguous()
    m = x if mask is None else mask.contiguous().view(torch.uint8)  # x: a dummy pointer, never read
    return x, gamma, m, (N, H * W, C)


def _reduce(x, dy, m, has_mask, dims, cfg, backward):
    N, HW, C = dims
    block_r, block_c, split, rows = cfg
    part = torch.empty((3 if backward else 1, N, split, C), dtype=torch.float32, device=x.device)
    _grn_reduce_kernel[(N, triton.cdiv(C, block_c), split)](
        x, dy, m, part, N, HW, C, rows,
        HAS_MASK=has_mask, BACKWARD=backward, BLOCK_R=block_r, BLOCK_C=block_c)
    return part


def _apply(a, x, m, has_mask, scale, shift, out, dims, cfg, backward):
    N, HW, C = dims
    block_r, block_c = cfg[0], cfg[1]
    grid = (triton.cdiv(N * HW, block_r), triton.cdiv(C, block_c))
    _grn_apply_kernel[grid](a, x, m, scale, shift, out, N * HW, HW, C,
                            HAS_MASK=has_mask, BACKWARD=backward, BLOCK_R=block_r, BLOCK_C=block_c)


def forward(x, gamma, beta, mask, eps):
    x, gamma, m, dims = _prepare(x, gamma, mask)
    N, HW, C = dims
    y = _alloc.empty_like(x)
    if x.numel() == 0:
        return y
    cfg = _blocks(N, HW, C, x.device)
    part = _reduce(x, x, m, mask is not None, dims, cfg, backward=False)
    scale = torch.empty((N, C), dtype=torch.float32, device=x.device)
    _grn_fwd_stats_kernel[(N,)](part, gamma, scale, C, cfg[2], eps, BLOCK_C=cfg[1])
    beta = beta.reshape(C).float().contiguous()
    _apply(x, x, m, mask is not None, scale, beta, y, dims, cfg, backward=False)
    return y


def backward(dy, x, gamma, mask, eps):
    x, gamma, m, dims = _prepare(x, gamma, mask)
    dy = dy.contiguous()
    N, HW, C = dims
    dx = _alloc.empty_like(x)
    if x.numel() == 0:
        zeros = torch.zeros(C, dtype=torch.float32, device=x.device)
        return dx, zeros, zeros.clone()
    cfg = _blocks(N, HW, C, x.device)
    part = _reduce(x, dy, m, mask is not None, dims, cfg, backward=True)
    scale, shift = (torch.empty((N, C), dtype=torch.float32, device=x.device) for _ in range(2))
    dparam = torch.empty((2, N, C), dtype=torch.float32, device=x.device)
    _grn_bwd_stats_kernel[(N,)](part, gamma, scale, shift, dparam, N, C, cfg[2], eps, BLOCK_C=cfg[1])
    _apply(dy, x, m, mask is not None, scale, shift, dx, dims, cfg, backward=True)
    return dx, dparam[0].sum(dim=0), dparam[1].sum(dim=0)  # separate sums: outputs may not alias
