"""Submanifold depthwise convolution in Triton (v2): one window load per tile, all taps from it.

    y[r, c] = bias[c] + sum_t w[t, c] * x[src_t(r), c]      over the valid taps t of output row r

Two layouts find the input row src_t(r) of tap t (same as csrc/cpu/sparse_dwconv.cpp):
  rows   (DENSE=False) r runs over the V gathered visible rows; src_t(r) = nbr[r, t], -1 = none (the
         stage's table, read through its strides: engine.sparse stores it tap-major on a GPU, so a
         tile's indices of one tap are contiguous);
  dense  (DENSE=True)  r runs over the N*H*W sites of channels-last x; src_t(r) = r + di*W + dj when
         inside the image; masked sites count as zero and output 0.

The window. Rows are ordered by (n, h, w) in both layouts, so every source of row r lies within
HALO = p*W + p rows of r (p = k // 2; in the rows layout fewer visible sites lie between, never more).
A program owns BLOCK_R consecutive rows and BLOCK_C channels: it loads the x rows
[r0 - HALO, r0 + BLOCK_R + HALO) once into a WIN-row register tile and takes every tap's shifted
rows from it with tl.gather; nothing is re-fetched per tap. BLOCK_R is sized against HALO (see
_blocks) so the halo adds little to x's rows. That is the interpreter's (counted) configuration; on a
GPU (WIN = 0) each tap's rows are read directly and the caches hold the reuse, because a register
window gathered across threads compiles to per-element selects (see _blocks). Both run in the tests.

Launches and counted budget (tests/engine/ops/test_sparse_conv_v2.py, under the interpreter; bytes
over unmasked lanes; s = element size, K = k*k, V = rows computed, h = 2*HALO / BLOCK_R):
  forward   1 launch  (row blocks, channel blocks)
            ideal: read x + write y (2 V C s), + the table (4 V K bytes, rows layout) or the
            mask (V bytes, dense); executed: x (1 + h) times, weights K C 4 per row block.
  backward  1 launch  (row blocks, channel blocks): dx with the taps reversed (a submanifold window is
            symmetric) and the K weight + 1 bias partial sums of the block, from one dy window and
            one x window, both read once, and one read of the table;
            ideal: read dy and x, write dx (3 V C s), + table / mask; executed: dy and x (1 + h)
            times, + the partials (K + 1) C 4 per row block, which torch adds up afterwards
            (fixed order: deterministic, no atomics).
  Asserted: moved bytes <= 1.25x the ideal at the tested shapes (halo and padding included);
  measured 1.08-1.11x forward, 1.11-1.17x backward. v1 (a load per tap; the weight gradient a grid
  over taps, a second backward launch) moved 2.6-8.4x forward and 6.4-23.9x backward at the same shapes.
A block of dense rows with no visible site skips its loads. All arithmetic is fp32; outputs take the
input dtype, weight/bias gradients stay fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.ops._target import gpu
from engine.ops import _alloc
from engine.ops.sparse_conv.taps import taps_transposed


@triton.jit
def _window(ptr, mask_ptr, base, R_in, C, cols, col_ok, WIN: tl.constexpr, DENSE: tl.constexpr,
            lo, hi):
    """The rows [lo, hi) of ptr (R_in, C) placed at base + arange(WIN), fp32, 0 where invisible."""
    wrows = base + tl.arange(0, WIN).to(tl.int64)
    ok = (wrows >= lo) & (wrows < hi) & (wrows >= 0) & (wrows < R_in)
    if DENSE:
        ok = ok & (tl.load(mask_ptr + wrows, mask=ok, other=0) != 0)
    v = tl.load(ptr + wrows[:, None] * C + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
    return v.to(tl.float32)


@triton.jit
def _position(rows, H, W, DENSE: tl.constexpr):
    """(h, w) of each dense row, int32, computed once per block rather than per tap (zeros for rows)."""
    if DENSE:
        hw = rows % (H * W)
        return (hw // W).to(tl.int32), (hw % W).to(tl.int32)
    zero = tl.zeros_like(rows).to(tl.int32)
    return zero, zero


@triton.jit
def _tap(rows, row_ok, t, nbr_ptr, s_row, s_tap, mask_ptr, base, R_in, h, w, H, W,
         KS: tl.constexpr, DENSE: tl.constexpr, WIN: tl.constexpr):
    """(tap t's source row for each row; whether it exists). With a window (WIN > 0) the source is
    its index in the window, clamped into it; without one, its absolute row."""
    if DENSE:
        di = t // KS - KS // 2
        dj = t % KS - KS // 2
        hh = h + di
        ww = w + dj
        src = rows + di * W + dj
        ok = row_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    else:
        src = tl.load(nbr_ptr + rows * s_row + t * s_tap, mask=row_ok, other=-1).to(tl.int64)
        ok = row_ok & (src >= 0) & (src < R_in)
    if WIN > 0:
        idx = src - base
        ok = ok & (idx >= 0) & (idx < WIN)  # always true for a table within HALO; keeps reads in the tile
        return tl.where(ok, idx, 0).to(tl.int32), ok
    if DENSE:  # the window zeroes invisible rows; a direct read asks the mask
        ok = ok & (tl.load(mask_ptr + src, mask=ok, other=0) != 0)
    return tl.where(ok, src, 0), ok


@triton.jit
def _shifted(win, ptr, C, cols, col_ok, src, ok, BLOCK_C: tl.constexpr, WIN: tl.constexpr):
    """The rows src of the input (BLOCK_R, BLOCK_C), fp32, 0 where the tap does not exist: taken from
    the window with tl.gather (WIN > 0), or read directly (WIN == 0; a GPU's L1 holds the reuse)."""
    if WIN > 0:
        g = tl.gather(win, tl.broadcast_to(src[:, None], (src.shape[0], BLOCK_C)), 0)
    else:
        g = tl.load(ptr + src[:, None] * C + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
        g = g.to(tl.float32)
    return tl.where(ok[:, None], g, 0.0)


@triton.jit
def _dwconv_fwd_kernel(
    x_ptr,     # (R_in, C) input rows: dense x viewed as (N*H*W, C), or the gathered feats (V, C)
    nbr_ptr,   # (R, K) int32 neighbour table, strides s_row, s_tap (rows layout only)
    mask_ptr,  # (R,) uint8 visibility (dense layout only)
    w_ptr,     # (K, C) fp32 taps, channel-contiguous (reversed for the input gradient)
    b_ptr,     # (C,) fp32 bias; read only when HAS_BIAS
    y_ptr,     # (R, C) output rows, input dtype
    R, R_in, C, H, W, HALO, s_row, s_tap,
    KS: tl.constexpr, DENSE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, WIN: tl.constexpr,
):
    r0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    rows = r0 + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < R
    col_ok = cols < C
    visible = row_ok
    if DENSE:
        visible = row_ok & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if tl.max(visible.to(tl.int32), axis=0) > 0:  # a fully masked block writes zeros only
        base = r0 - HALO
        xw = 0.0
        if WIN > 0:
            xw = _window(x_ptr, mask_ptr, base, R_in, C, cols, col_ok, WIN, DENSE, base, r0 + BLOCK_R + HALO)
        h, w = _position(rows, H, W, DENSE)
        for t in range(KS * KS):  # not unrolled: see the backward
            src, ok = _tap(rows, visible, t, nbr_ptr, s_row, s_tap, mask_ptr, base, R_in, h, w, H, W, KS, DENSE, WIN)
            wv = tl.load(w_ptr + t * C + cols, mask=col_ok, other=0.0)
            acc += _shifted(xw, x_ptr, C, cols, col_ok, src, ok, BLOCK_C, WIN) * wv[None, :]
    out = tl.where(visible[:, None], acc, 0.0)
    tl.store(y_ptr + rows[:, None] * C + cols[None, :], out.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _dwconv_bwd_kernel(
    x_ptr,     # (R_in, C) input rows of the forward
    dy_ptr,    # (R, C) upstream gradient rows (R == R_in: the table is square)
    nbr_ptr,   # (R, K) int32 neighbour table, strides s_row, s_tap (rows layout only)
    mask_ptr,  # (R,) uint8 visibility (dense layout only)
    wr_ptr,    # (K, C) fp32 taps reversed: dx is the conv of dy with them
    dx_ptr,    # (R, C) out, input dtype
    part_ptr,  # (row blocks, K + 1, C) fp32 out: per block sum_r dy * x[src_t] for each tap, then sum_r dy
    R, C, H, W, HALO, s_row, s_tap,
    KS: tl.constexpr, DENSE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, WIN: tl.constexpr,
):
    blk = tl.program_id(0)
    r0 = blk.to(tl.int64) * BLOCK_R
    rows = r0 + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < R
    col_ok = cols < C
    visible = row_ok
    if DENSE:
        visible = row_ok & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
    part = part_ptr + blk * (KS * KS + 1) * C + cols
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    if tl.max(visible.to(tl.int32), axis=0) > 0:
        base = r0 - HALO
        hi = r0 + BLOCK_R + HALO
        xw = 0.0
        dyw = 0.0
        if WIN > 0:
            xw = _window(x_ptr, mask_ptr, base, R, C, cols, col_ok, WIN, DENSE, base, hi)
            dyw = _window(dy_ptr, mask_ptr, base, R, C, cols, col_ok, WIN, DENSE, base, hi)
            own = (rows - base).to(tl.int32)  # the block's own rows of the window
        else:
            own = rows
        dy = _shifted(dyw, dy_ptr, C, cols, col_ok, own, visible, BLOCK_C, WIN)
        h, w = _position(rows, H, W, DENSE)
        for t in range(KS * KS):  # not unrolled: 49 taps' hoisted loads spilled on sm_90 (sm90-static.md)
            src, ok = _tap(rows, visible, t, nbr_ptr, s_row, s_tap, mask_ptr, base, R, h, w, H, W, KS, DENSE, WIN)
            wv = tl.load(wr_ptr + t * C + cols, mask=col_ok, other=0.0)
            acc += _shifted(dyw, dy_ptr, C, cols, col_ok, src, ok, BLOCK_C, WIN) * wv[None, :]
            # tap t of row r reads x[src]; its weight gradient is dy[r] * x[src], summed over r
            tl.store(part + t * C, tl.sum(dy * _shifted(xw, x_ptr, C, cols, col_ok, src, ok, BLOCK_C, WIN), axis=0),
                     mask=col_ok)
        tl.store(part + KS * KS * C, tl.sum(dy, axis=0), mask=col_ok)
    else:  # the block adds nothing to the weight gradient
        for t in tl.static_range(KS * KS + 1):
            tl.store(part + t * C, tl.zeros([BLOCK_C], tl.float32), mask=col_ok)
    out = tl.where(visible[:, None], acc, 0.0)
    tl.store(dx_ptr + rows[:, None] * C + cols[None, :], out.to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _blocks(halo: int, C: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_C, WIN, num_warps); WIN = the window's rows, BLOCK_R + 2 HALO to a power of two,
    or 0: no window, each tap's rows read directly.

    Interpreter (the counted budget): BLOCK_R >= 8 HALO up to 4096 rows, so the halo adds <= 25% to
    x's rows. GPU: no window. tl.gather from a register tile whose gathered axis spans threads lowers,
    per tap, to selects over every register of the window: the sm_90 forward at W = 56 (a 1024 x 16
    window, 49 taps) became 14 MB of PTX that ptxas had not finished after 8 minutes (engine/bench/sm90.py).
    Read directly, a tile's 49 shifted reads of the same ~(BLOCK_R + 2 HALO) rows are L1 / L2 hits;
    HBM sees about the window. 128 rows x 32 channels, 8 warps: no sm_90 binary spills (256 rows spilled
    the dense backward at 8 warps and the dense forward at 4); the backward's per-block weight partials
    ((K + 1) C fp32 = 200 C bytes) add ~26% to its 768 C bytes of x, dy and dx. Not yet timed on a GPU."""
    if gpu(device) is None:
        block_r = min(max(triton.next_power_of_2(max(8 * halo, 1)), 64), 4096)
        block_c = min(triton.next_power_of_2(C), 128)
        return block_r, block_c, triton.next_power_of_2(block_r + 2 * halo), 4
    return 128, min(triton.next_power_of_2(C), 32), 0, 8


def _table_args(nbr, x):
    if nbr is None:
        return x, 0, 0  # a pointer argument that the kernel never reads
    return nbr, nbr.stride(0), nbr.stride(1)


def _conv(x, nbr, mask, wT, bias, ks, R, H, W, halo):
    C = x.shape[-1]
    y = _alloc.empty((R, C), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_r, block_c, win, warps = _blocks(halo, C, x.device)
    dense = mask is not None
    table, s_row, s_tap = _table_args(nbr, x)
    _dwconv_fwd_kernel[(triton.cdiv(R, block_r), triton.cdiv(C, block_c))](
        x, table, mask.view(torch.uint8) if dense else x, wT, bias if bias is not None else wT, y,
        R, x.numel() // C, C, H, W, halo, s_row, s_tap,
        KS=ks, DENSE=dense, HAS_BIAS=bias is not None, BLOCK_R=block_r, BLOCK_C=block_c, WIN=win, num_warps=warps)
    return y


def _backward(dy, x, nbr, mask, weight, R, H, W, halo):
    C, ks = weight.shape[0], weight.shape[-1]
    K = ks * ks
    dx = _alloc.empty((R, C), dtype=x.dtype, device=x.device)
    if R == 0 or C == 0:
        return (dx, torch.zeros(weight.shape, dtype=torch.float32, device=x.device),
                torch.zeros(C, dtype=torch.float32, device=x.device))
    block_r, block_c, win, warps = _blocks(halo, C, x.device)
    blocks = triton.cdiv(R, block_r)
    part = _alloc.empty((blocks, K + 1, C), dtype=torch.float32, device=x.device)
    dense = mask is not None
    table, s_row, s_tap = _table_args(nbr, x)
    _dwconv_bwd_kernel[(blocks, triton.cdiv(C, block_c))](
        x, dy, table, mask.view(torch.uint8) if dense else x, taps_transposed(weight, x, flip=True), dx, part,
        R, C, H, W, halo, s_row, s_tap,
        KS=ks, DENSE=dense, BLOCK_R=block_r, BLOCK_C=block_c, WIN=win, num_warps=warps)
    total = part.sum(dim=0)  # (K + 1, C); block order is fixed
    return dx, total[:K].t().contiguous().view(weight.shape), total[K].clone()  # (K, C) -> (C, 1, k, k)


def _bias(bias, C):
    return None if bias is None else bias.reshape(C).float().contiguous()


def _dense_halo(k: int, W: int) -> int:
    return (k // 2) * W + k // 2


def forward(x, weight, bias, mask):
    x, mask = x.contiguous(), mask.contiguous()
    N, H, W, C = x.shape
    k = weight.shape[-1]
    y = _conv(x, None, mask, taps_transposed(weight, x), _bias(bias, C), k, N * H * W, H, W, _dense_halo(k, W))
    return y.view(x.shape)


def backward(dy, x, weight, mask):
    x, dy, mask = x.contiguous(), dy.contiguous(), mask.contiguous()
    N, H, W, C = x.shape
    dx, dw, db = _backward(dy, x, None, mask, weight, N * H * W, H, W, _dense_halo(weight.shape[-1], W))
    return dx.view(x.shape), dw, db


def rows_forward(feats, neighbours, weight, bias):
    from engine.ops.sparse_conv.op import table_halo

    feats = feats.contiguous()
    C = feats.shape[1]
    return _conv(feats, neighbours, None, taps_transposed(weight, feats), _bias(bias, C), weight.shape[-1],
                 neighbours.shape[0], 1, 1, table_halo(neighbours))


def rows_backward(dy, feats, neighbours, weight):
    from engine.ops.sparse_conv.op import table_halo

    feats, dy = feats.contiguous(), dy.contiguous()
    return _backward(dy, feats, neighbours, None, weight, neighbours.shape[0], 1, 1, table_halo(neighbours))
