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
_blocks) so the halo adds little to x's rows.

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
def _tap(rows, row_ok, t, nbr_ptr, s_row, s_tap, base, R_in, H, W,
         KS: tl.constexpr, DENSE: tl.constexpr, WIN: tl.constexpr):
    """(window index of tap t's source for each row, clamped into the window; whether the tap exists)."""
    if DENSE:
        di = t // KS - KS // 2
        dj = t % KS - KS // 2
        hw = rows % (H * W)
        hh = hw // W + di
        ww = hw % W + dj
        src = rows + di * W + dj
        ok = row_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    else:
        src = tl.load(nbr_ptr + rows * s_row + t * s_tap, mask=row_ok, other=-1).to(tl.int64)
        ok = row_ok & (src >= 0) & (src < R_in)
    idx = src - base
    ok = ok & (idx >= 0) & (idx < WIN)  # always true for a table within HALO; keeps reads in the tile
    return tl.where(ok, idx, 0).to(tl.int32), ok


@triton.jit
def _shifted(win, idx, ok, BLOCK_C: tl.constexpr):
    """win's rows idx (BLOCK_R, BLOCK_C), 0 where the tap does not exist."""
    g = tl.gather(win, tl.broadcast_to(idx[:, None], (idx.shape[0], BLOCK_C)), 0)
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
        xw = _window(x_ptr, mask_ptr, base, R_in, C, cols, col_ok, WIN, DENSE, base, r0 + BLOCK_R + HALO)
        for t in tl.static_range(KS * KS):
            idx, ok = _tap(rows, visible, t, nbr_ptr, s_row, s_tap, base, R_in, H, W, KS, DENSE, WIN)
            wv = tl.load(w_ptr + t * C + cols, mask=col_ok, other=0.0)
            acc += _shifted(xw, idx, ok, BLOCK_C) * wv[None, :]
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
        xw = _window(x_ptr, mask_ptr, base, R, C, cols, col_ok, WIN, DENSE, base, hi)
        dyw = _window(dy_ptr, mask_ptr, base, R, C, cols, col_ok, WIN, DENSE, base, hi)
        own = tl.broadcast_to((rows - base).to(tl.int32)[:, None], (BLOCK_R, BLOCK_C))
        dy = tl.where(visible[:, None], tl.gather(dyw, own, 0), 0.0)  # the block's own rows of the window
        for t in tl.static_range(KS * KS):
            idx, ok = _tap(rows, visible, t, nbr_ptr, s_row, s_tap, base, R, H, W, KS, DENSE, WIN)
            wv = tl.load(wr_ptr + t * C + cols, mask=col_ok, other=0.0)
            acc += _shifted(dyw, idx, ok, BLOCK_C) * wv[None, :]
            # tap t of row r reads x[src]; its weight gradient is dy[r] * x[src], summed over r
            tl.store(part + t * C, tl.sum(dy * _shifted(xw, idx, ok, BLOCK_C), axis=0), mask=col_ok)
        tl.store(part + KS * KS * C, tl.sum(dy, axis=0), mask=col_ok)
    else:  # the block adds nothing to the weight gradient
        for t in tl.static_range(KS * KS + 1):
            tl.store(part + t * C, tl.zeros([BLOCK_C], tl.float32), mask=col_ok)
    out = tl.where(visible[:, None], acc, 0.0)
    tl.store(dx_ptr + rows[:, None] * C + cols[None, :], out.to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _blocks(halo: int, C: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_C, WIN, num_warps); WIN = the window's rows, BLOCK_R + 2 HALO to a power of two.

    Interpreter (the counted budget): BLOCK_R >= 8 HALO up to 4096 rows, so the halo adds <= 25% to
    x's rows. GPU: the x and dy windows sit in registers / shared memory for tl.gather, so blocks stay
    small: 16 channels, BLOCK_R ~2-4 HALO up to 512 rows (at W = 56 the halo then adds 67% of x's rows,
    which neighbouring programs read through L2). Not yet timed or compiled on a GPU."""
    if gpu(device) is None:
        block_r = min(max(triton.next_power_of_2(max(8 * halo, 1)), 64), 4096)
        block_c = min(triton.next_power_of_2(C), 128)
        warps = 4
    else:
        block_r = min(max(triton.next_power_of_2(max(2 * halo, 1)), 32), 512)
        block_c = min(triton.next_power_of_2(C), 16)
        warps = 8
    return block_r, block_c, triton.next_power_of_2(block_r + 2 * halo), warps


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
