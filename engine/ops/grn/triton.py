"""kfe::grn in Triton: forward and backward, channels-last, optional per-sample visibility mask.

x is viewed as R = N*H*W rows of C channels. Each direction is two launches:

  reduce   (N, C-blocks, splits)  sums over H*W per (n, c): x^2, and for backward dy*x and dy
  apply    (N, HW-blocks, C-blocks)  per sample, from the reduce's partials: Gx = sqrt(sum x^2),
                                  D = mean_c Gx + eps and the per-channel coefficients (recomputed by
                                  each program from O(SPLIT * C) partials: no stats launch, no (N, C)
                                  tables gathered per element); then y = x*scale + beta, or
                                  dx = dy*scale + x*shift; 0 at masked rows; backward also writes the
                                  per-sample dgamma/dbeta (summed over N in torch)

Counted budget (tests/engine/ops/test_grn_v2.py, under the interpreter): launches 2 forward, 2
backward; bytes (unmasked lanes) within 1.25x of the two-pass ideal: forward reads x twice and writes
y (3 R C elements), backward reads x and dy twice and writes dx (5 R C elements); the partials and
gamma/beta (O(N * SPLIT * C) per program) are the rest. gamma/beta are cast to fp32 in the kernels.
All arithmetic is fp32. When N * C-blocks is too small to fill the GPU, the H*W reduction is split and
the apply kernel adds the partial sums, which keeps the result deterministic (no atomics).

Tiles per C (_blocks, GPU; the interpreter takes few large programs instead): BLOCK_C is the widest
power of two <= 128 that pads C by at most C/8, BLOCK_R = 4096 / BLOCK_C rows (32..512, capped at
HW rounded up and halved while the row tail pads more than HW/4; e.g. at C = 160: HW = 196 -> 32,
784 -> 128, 3136 -> 128), the same for fp32 and 16-bit inputs (registers hold fp32 either way):
  C        40    80    96    160   320   384   640   768   1280  2560 (ConvNeXt V2 atto..huge: 4 x dim)
  BLOCK_C  8     16    32    32    64    128   128   128   128   128
  BLOCK_R  512   256   128   128   64    32    32    32    32    32   (before the HW cap)
so no ConvNeXt V2 width runs padded lanes (a fixed 128 padded 40 to 128: 69% of the lanes masked).
Counted with these tiles for C = 40, 80, 160, 320 in tests/engine/ops/test_grn_v2.py. Each apply
program also reloads its sample's O(SPLIT * C) partials (L1/L2-resident): at small H*W and narrow
tiles (e.g. 12 x 12 x 160 bf16, 32 x 32 tiles) that is ~1.4x the ideal bytes; from H*W = 256 on, <= 1.1x.
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
def _grn_apply_kernel(
    a_ptr,      # (R, C) forward: x; backward: dy
    x_ptr,      # (R, C) backward: x; unused in forward
    mask_ptr,   # (R,) uint8, nonzero = visible; read only when HAS_MASK
    part_ptr,   # (K, N, SPLIT, C) fp32 partial sums from _grn_reduce_kernel
    gamma_ptr,  # (C,) gamma in its own dtype
    beta_ptr,   # (C,) beta in its own dtype (forward); unused in backward
    out_ptr,    # (R, C) y or dx, in the input dtype
    dparam_ptr, # (2, N, C) fp32 out (backward): per-sample dgamma and dbeta, summed over N afterwards
    N, HW, C, SPLIT, eps,
    HAS_MASK: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0)
    hb = tl.program_id(1)
    cb = tl.program_id(2)
    plane = N * SPLIT * C
    # Per-sample statistics, recomputed by every program from the (SPLIT, C) partials of its sample
    # (O(SPLIT * C) loads, cached) instead of a separate stats launch and (N, C) tables.
    total = tl.zeros([BLOCK_C], tl.float32)
    cross = tl.zeros([BLOCK_C], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cs_ok = cs < C
        g_all = tl.sqrt(_sum_splits(part_ptr, n, cs, cs_ok, C, SPLIT))
        total += g_all
        if BACKWARD:
            s_all = _sum_splits(part_ptr + plane, n, cs, cs_ok, C, SPLIT)
            gam = tl.load(gamma_ptr + cs, mask=cs_ok, other=0.0).to(tl.float32)
            cross += gam * s_all * g_all
    denom = tl.sum(total, axis=0) / C + eps
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    gx = tl.sqrt(_sum_splits(part_ptr, n, cols, col_ok, C, SPLIT))
    gamma = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    nx = gx / denom
    scale = 1.0 + gamma * nx  # y = x * scale + beta; dx = dy * scale + x * shift
    if BACKWARD:
        s = _sum_splits(part_ptr + plane, n, cols, col_ok, C, SPLIT)
        dgx = gamma * s / denom - tl.sum(cross, axis=0) / (denom * denom * C)
        shift = tl.where(gx > 0, dgx / tl.where(gx > 0, gx, 1.0), 0.0)  # torch.norm's subgradient at 0
        if hb == 0:
            tl.store(dparam_ptr + n * C + cols, s * nx, mask=col_ok)
            tl.store(dparam_ptr + (N + n) * C + cols, _sum_splits(part_ptr + 2 * plane, n, cols, col_ok, C, SPLIT),
                     mask=col_ok)
    else:
        shift = tl.load(beta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    hw = hb * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = hw < HW
    rows = n.to(tl.int64) * HW + hw
    visible = row_ok
    if HAS_MASK:
        visible = visible & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    read_ok = visible[:, None] & col_ok[None, :]
    offs = rows[:, None] * C + cols[None, :]
    out = tl.load(a_ptr + offs, mask=read_ok, other=0.0).to(tl.float32) * scale[None, :]
    if BACKWARD:
        out += tl.load(x_ptr + offs, mask=read_ok, other=0.0).to(tl.float32) * shift[None, :]
    else:
        out += shift[None, :]
    out = tl.where(visible[:, None], out, 0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=tile_ok)


TILE_ELEMENTS = 4096  # per program tile on a GPU (32 x 128 fp32 in registers); 16-bit inputs alike (math is fp32)
MAX_BLOCK_C = 128


def _block_c(C: int) -> int:
    """Channel tile: the widest power of two <= 128 whose padding (cdiv(C, B) * B - C lanes) is at most C/8,
    so ConvNeXt V2's channel counts run on unpadded tiles: C = 40 -> 8, 80 -> 16, 96 -> 32, 160 -> 32,
    320 -> 64, 640 / 768 / 1280 / 2560 -> 128 (a fixed 128 wasted 37-60% of the lanes at 40, 80, 160)."""
    block = min(triton.next_power_of_2(C), MAX_BLOCK_C)
    while block > 8 and triton.cdiv(C, block) * block - C > C / 8:
        block //= 2
    return block


def _blocks(N: int, HW: int, C: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_C, split, rows_per_split). The interpreter wants few, large programs. On a GPU:
    BLOCK_C by _block_c, BLOCK_R = TILE_ELEMENTS / BLOCK_C rows (32..512, at most HW rounded up to a
    power of two, halved while the last row block pads more than HW/4 rows: each program also reloads
    its sample's O(C) statistics, so rows are not cut below 32), and the H*W reduction
    split until there are ~4 programs per SM."""
    target = gpu(device)
    if target is None:
        return min(triton.next_power_of_2(HW), 256), min(triton.next_power_of_2(C), 512), 1, HW
    block_c = _block_c(C)
    block_r = max(32, min(TILE_ELEMENTS // block_c, 512, triton.next_power_of_2(HW)))
    while block_r > 32 and triton.cdiv(HW, block_r) * block_r - HW > HW / 4:  # a shorter row tail
        block_r //= 2
    programs = N * triton.cdiv(C, block_c)
    split = max(1, min(triton.cdiv(4 * target.sm_count, programs), triton.cdiv(HW, 4 * block_r)))
    rows = triton.cdiv(triton.cdiv(HW, split), block_r) * block_r
    return block_r, block_c, triton.cdiv(HW, rows), rows


def _prepare(x, gamma, mask):
    x = x.contiguous()
    N, H, W, C = x.shape
    gamma = gamma.reshape(C).contiguous()  # cast to fp32 inside the kernels (no copy here)
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


def _apply(a, x, m, has_mask, part, gamma, beta, out, dparam, dims, cfg, eps, backward):
    N, HW, C = dims
    block_r, block_c, split = cfg[0], cfg[1], cfg[2]
    grid = (N, triton.cdiv(HW, block_r), triton.cdiv(C, block_c))
    _grn_apply_kernel[grid](a, x, m, part, gamma, beta, out, dparam, N, HW, C, split, eps,
                            HAS_MASK=has_mask, BACKWARD=backward, BLOCK_R=block_r, BLOCK_C=block_c)


def forward(x, gamma, beta, mask, eps):
    x, gamma, m, dims = _prepare(x, gamma, mask)
    N, HW, C = dims
    y = _alloc.empty_like(x)
    if x.numel() == 0:
        return y
    cfg = _blocks(N, HW, C, x.device)
    part = _reduce(x, x, m, mask is not None, dims, cfg, backward=False)
    beta = beta.reshape(C).contiguous()
    _apply(x, x, m, mask is not None, part, gamma, beta, y, part, dims, cfg, eps, backward=False)
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
    dparam = torch.empty((2, N, C), dtype=torch.float32, device=x.device)
    _apply(dy, x, m, mask is not None, part, gamma, gamma, dx, dparam, dims, cfg, eps, backward=True)
    return dx, dparam[0].sum(dim=0), dparam[1].sum(dim=0)  # separate sums: outputs may not alias
