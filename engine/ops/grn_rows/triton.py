"""kfe::grn_rows in Triton: GRN on a stage's rows (V, C), statistics per sample, any row counts.

Sample n's rows are offsets[n]:offsets[n + 1]; each program walks its own sample's rows, so no
per-element (N, C) table is gathered and uneven samples need no padding. Two launches each way:

  reduce  (N, C-blocks)  per (n, c) sums over the sample's rows: x^2; backward also dy*x and dy
  apply   (N, C-blocks)  the per-sample coefficients from the (N, C) sums (each program reads its
                         sample's C sums to get mean_c Gx), then y = x*scale + beta, or
                         dx = dy*scale + x*shift; backward writes per-sample dgamma (N, C) too
                         (dgamma, dbeta summed over N in torch)

Counted budget (tests/engine/ops/test_sparse_conv_v2.py, interpreter; bytes over unmasked lanes):
launches 2 forward, 2 backward; bytes within 1.25x of the two-pass ideal: forward reads x twice and
writes y (3 V C elements), backward reads x and dy twice and writes dx (5 V C elements); the (N, C)
sums and gamma/beta are the rest. All arithmetic is fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.ops._target import gpu
from engine.ops import _alloc


@triton.jit
def _grn_rows_reduce_kernel(
    x_ptr,     # (V, C) rows
    dy_ptr,    # (V, C) upstream gradient; read only when BACKWARD
    off_ptr,   # (N + 1,) int64 first row of each sample
    sums_ptr,  # (S, N, C) fp32 out: S=1 [x^2], or S=3 [x^2, dy*x, dy] when BACKWARD
    N, C,
    BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    start = tl.load(off_ptr + n)
    stop = tl.load(off_ptr + n + 1)
    sq = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    sx = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    sd = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for r0 in range(start, stop, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        ok = (rows < stop)[:, None] & col_ok[None, :]
        offs = rows[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        sq += x * x
        if BACKWARD:
            d = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            sx += d * x
            sd += d
    out = sums_ptr + n * C + cols
    tl.store(out, tl.sum(sq, axis=0), mask=col_ok)
    if BACKWARD:
        tl.store(out + N * C, tl.sum(sx, axis=0), mask=col_ok)
        tl.store(out + 2 * N * C, tl.sum(sd, axis=0), mask=col_ok)


@triton.jit
def _grn_rows_apply_kernel(
    a_ptr,      # (V, C) forward: x; backward: dy
    x_ptr,      # (V, C) backward: x; unused in forward
    off_ptr,    # (N + 1,) int64
    sums_ptr,   # (S, N, C) fp32 from the reduce kernel
    gamma_ptr,  # (C,) in its own dtype
    beta_ptr,   # (C,) in its own dtype (forward)
    out_ptr,    # (V, C) y or dx, input dtype
    dgamma_ptr, # (N, C) fp32 out (backward): per-sample dgamma
    N, C, eps,
    BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0)
    # mean_c Gx (and, backward, sum_c gamma * s * Gx) of sample n, from its C sums
    total = tl.zeros([BLOCK_C], tl.float32)
    cross = tl.zeros([BLOCK_C], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cs_ok = cs < C
        g_all = tl.sqrt(tl.load(sums_ptr + n * C + cs, mask=cs_ok, other=0.0))
        total += g_all
        if BACKWARD:
            s_all = tl.load(sums_ptr + N * C + n * C + cs, mask=cs_ok, other=0.0)
            gam = tl.load(gamma_ptr + cs, mask=cs_ok, other=0.0).to(tl.float32)
            cross += gam * s_all * g_all
    denom = tl.sum(total, axis=0) / C + eps
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    gx = tl.sqrt(tl.load(sums_ptr + n * C + cols, mask=col_ok, other=0.0))
    gam = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    nx = gx / denom
    scale = 1.0 + gam * nx
    if BACKWARD:
        s = tl.load(sums_ptr + N * C + n * C + cols, mask=col_ok, other=0.0)
        dgx = gam * s / denom - tl.sum(cross, axis=0) / (denom * denom * C)
        shift = tl.where(gx > 0, dgx / tl.where(gx > 0, gx, 1.0), 0.0)  # dGx/dx = x / Gx, 0 at Gx = 0
        tl.store(dgamma_ptr + n * C + cols, s * nx, mask=col_ok)
    else:
        beta = tl.load(beta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    start = tl.load(off_ptr + n)
    stop = tl.load(off_ptr + n + 1)
    for r0 in range(start, stop, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        ok = (rows < stop)[:, None] & col_ok[None, :]
        offs = rows[:, None] * C + cols[None, :]
        a = tl.load(a_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if BACKWARD:
            x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            out = a * scale[None, :] + x * shift[None, :]
        else:
            out = a * scale[None, :] + beta[None, :]
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=ok)


def _blocks(C: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): interpreter few large programs; GPU 64 rows x up to 64 channels."""
    if gpu(device) is None:
        return 256, min(triton.next_power_of_2(C), 256), 4
    return 64, min(triton.next_power_of_2(C), 64), 4


def forward(x, offsets, gamma, beta, eps):
    x, offsets = x.contiguous(), offsets.contiguous()
    V, C = x.shape
    N = offsets.shape[0] - 1
    y = _alloc.empty((V, C), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_r, block_c, warps = _blocks(C, x.device)
    grid = (N, triton.cdiv(C, block_c))
    sums = _alloc.empty((1, N, C), dtype=torch.float32, device=x.device)
    _grn_rows_reduce_kernel[grid](x, x, offsets, sums, N, C, BACKWARD=False, BLOCK_R=block_r, BLOCK_C=block_c,
                                  num_warps=warps)
    _grn_rows_apply_kernel[grid](x, x, offsets, sums, gamma.reshape(C).contiguous(), beta.reshape(C).contiguous(),
                                 y, sums, N, C, eps, BACKWARD=False, BLOCK_R=block_r, BLOCK_C=block_c,
                                 num_warps=warps)
    return y


def backward(dy, x, offsets, gamma, eps):
    x, dy, offsets = x.contiguous(), dy.contiguous(), offsets.contiguous()
    V, C = x.shape
    N = offsets.shape[0] - 1
    dx = _alloc.empty((V, C), dtype=x.dtype, device=x.device)
    if dx.numel() == 0:
        zeros = torch.zeros(C, dtype=torch.float32, device=x.device)
        return dx, zeros, zeros.clone()
    block_r, block_c, warps = _blocks(C, x.device)
    grid = (N, triton.cdiv(C, block_c))
    sums = _alloc.empty((3, N, C), dtype=torch.float32, device=x.device)
    dgamma = _alloc.empty((N, C), dtype=torch.float32, device=x.device)
    gam = gamma.reshape(C).contiguous()
    _grn_rows_reduce_kernel[grid](x, dy, offsets, sums, N, C, BACKWARD=True, BLOCK_R=block_r, BLOCK_C=block_c,
                                  num_warps=warps)
    _grn_rows_apply_kernel[grid](dy, x, offsets, sums, gam, gam, dx, dgamma, N, C, eps, BACKWARD=True,
                                 BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    return dx, dgamma.sum(dim=0), sums[2].sum(dim=0)
