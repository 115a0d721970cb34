"""Submanifold depthwise convolution in Triton: forward, input gradient, weight and bias gradients.

    y[r, c] = bias[c] + sum_t w[t, c] * x[src_t(r), c]      over the valid taps t of output row r

Two layouts find the input row src_t(r) of tap t (same as csrc/cpu/sparse_dwconv.cpp):
  rows   (DENSE=False) r runs over the V gathered visible rows; src_t(r) = nbr[r, t], -1 = none
         (the per-stage neighbour table of engine.sparse);
  dense  (DENSE=True)  r runs over the N*H*W sites of channels-last x; src_t(r) is the t-th site of
         r's k x k window when inside the image and visible; masked rows output 0, and a block of
         rows with no visible site skips the taps entirely, in the forward and the weight gradient
         (FCMAE masks are patch-aligned, so whole blocks are masked: the work follows the visible blocks).

Launches:
  fwd    (row blocks, channel blocks)         also the input gradient: dy with the taps reversed,
                                              since a submanifold window is symmetric
  wgrad  (K + 1, row splits, channel blocks)  per tap t (and t = K for the bias) the partial
                                              sums over a split of rows; the tap is the fastest
                                              grid axis so programs sharing rows run together and
                                              hit L2. Splits are added afterwards: deterministic.
All arithmetic is fp32; outputs take the input dtype, weight/bias gradients stay fp32.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from engine.ops._target import gpu
from engine.ops import _alloc
from engine.ops.sparse_conv.taps import taps_transposed


@triton.jit
def _tap_source(rows, row_ok, t, nbr_ptr, mask_ptr, R_in, H, W,
                KS: tl.constexpr, DENSE: tl.constexpr):
    """(input rows of tap t for output rows `rows`, whether each tap is valid)."""
    if DENSE:
        di = t // KS - KS // 2
        dj = t % KS - KS // 2
        hw = rows % (H * W)
        hh = hw // W + di
        ww = hw % W + dj
        src = rows + di * W + dj
        ok = row_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        ok = ok & (tl.load(mask_ptr + src, mask=ok, other=0) != 0)
    else:
        src = tl.load(nbr_ptr + rows * (KS * KS) + t, mask=row_ok, other=-1).to(tl.int64)
        ok = row_ok & (src >= 0) & (src < R_in)
    return src, ok


@triton.jit
def _dwconv_fwd_kernel(
    x_ptr,     # (R_in, C) input rows: dense x viewed as (N*H*W, C), or the gathered feats (V, C)
    nbr_ptr,   # (R, K) int32 neighbour table (rows layout only)
    mask_ptr,  # (R,) uint8 visibility (dense layout only)
    w_ptr,     # (K, C) fp32 taps, channel-contiguous (reversed for the input gradient)
    b_ptr,     # (C,) fp32 bias; read only when HAS_BIAS
    y_ptr,     # (R, C) output rows, input dtype
    R, R_in, C, H, W,
    KS: tl.constexpr, DENSE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
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
        for t in tl.static_range(KS * KS):
            src, ok = _tap_source(rows, visible, t, nbr_ptr, mask_ptr, R_in, H, W, KS, DENSE)
            xv = tl.load(x_ptr + src[:, None] * C + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
            wv = tl.load(w_ptr + t * C + cols, mask=col_ok, other=0.0)
            acc += xv.to(tl.float32) * wv[None, :]
    out = tl.where(visible[:, None], acc, 0.0)
    tl.store(y_ptr + rows[:, None] * C + cols[None, :], out.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _dwconv_wgrad_kernel(
    x_ptr,     # (R_in, C) input rows of the forward
    dy_ptr,    # (R, C) upstream gradient rows
    nbr_ptr,   # (R, K) int32 neighbour table (rows layout only)
    mask_ptr,  # (R,) uint8 visibility (dense layout only)
    part_ptr,  # (SPLIT, K + 1, C) fp32 out: per split, sum_r dy * x[src_t] for each tap, then sum_r dy
    R, R_in, C, H, W, rows_per_split,
    KS: tl.constexpr, DENSE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    t = tl.program_id(0)  # tap; t == K: the bias
    split = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, R)
    for r0 in range(start, stop, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        row_ok = rows < stop
        if DENSE:
            row_ok = row_ok & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
        if tl.max(row_ok.to(tl.int32), axis=0) > 0:  # a fully masked block adds zeros: skip its loads
            dy = tl.load(dy_ptr + rows[:, None] * C + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                         other=0.0)
            if t < KS * KS:
                src, ok = _tap_source(rows, row_ok, t, nbr_ptr, mask_ptr, R_in, H, W, KS, DENSE)
                xv = tl.load(x_ptr + src[:, None] * C + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                             other=0.0)
                acc += dy.to(tl.float32) * xv.to(tl.float32)
            else:
                acc += dy.to(tl.float32)
    tl.store(part_ptr + (split * (KS * KS + 1) + t) * C + cols, tl.sum(acc, axis=0), mask=col_ok)


def _fwd_blocks(C: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps). The interpreter wants few, large programs.

    GPU: 8 warps, 8 fp32 accumulators a thread. On 4 warps (16 a thread) triton 3.6 keeps the 49
    unrolled taps' loads of the dense-masked 16-bit kernel in flight: 255 registers + ~650 B of
    stack (python -m engine.bench.sm90); on 8 warps ~80 registers, no spill, under 3.6 and 3.8."""
    if gpu(device) is None:
        return 512, min(triton.next_power_of_2(C), 256), 4
    return 16, min(triton.next_power_of_2(C), 128), 8


def _wgrad_blocks(R: int, C: int, K: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_C, splits, rows_per_split): about 4 programs per SM across taps and splits."""
    target = gpu(device)
    if target is None:
        return min(triton.next_power_of_2(R), 512), min(triton.next_power_of_2(C), 256), 1, max(R, 1)
    block_r, block_c = 32, min(triton.next_power_of_2(C), 64)
    programs = (K + 1) * triton.cdiv(C, block_c)
    split = max(1, min(triton.cdiv(4 * target.sm_count, programs), triton.cdiv(R, 4 * block_r)))
    rows = triton.cdiv(triton.cdiv(R, split), block_r) * block_r
    return block_r, block_c, triton.cdiv(R, rows), rows


def _conv(x, nbr, mask, wT, bias, ks, R, H, W):
    C = x.shape[-1]
    y = _alloc.empty((R, C), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_r, block_c, warps = _fwd_blocks(C, x.device)
    dense = mask is not None
    dummy = x  # a pointer argument that the kernel never reads
    _dwconv_fwd_kernel[(triton.cdiv(R, block_r), triton.cdiv(C, block_c))](
        x, nbr if nbr is not None else dummy, mask.view(torch.uint8) if dense else dummy, wT,
        bias if bias is not None else wT, y, R, x.numel() // C, C, H, W,
        KS=ks, DENSE=dense, HAS_BIAS=bias is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    return y


def _wgrad(dy, x, nbr, mask, weight, R, H, W):
    C, ks = weight.shape[0], weight.shape[-1]
    K = ks * ks
    if R == 0 or C == 0:
        return (torch.zeros(weight.shape, dtype=torch.float32, device=x.device),
                torch.zeros(C, dtype=torch.float32, device=x.device))
    block_r, block_c, split, rows = _wgrad_blocks(R, C, K, x.device)
    part = _alloc.empty((split, K + 1, C), dtype=torch.float32, device=x.device)
    dense = mask is not None
    _dwconv_wgrad_kernel[(K + 1, split, triton.cdiv(C, block_c))](
        x, dy, nbr if nbr is not None else x, mask.view(torch.uint8) if dense else x, part,
        R, x.numel() // C, C, H, W, rows, KS=ks, DENSE=dense, BLOCK_R=block_r, BLOCK_C=block_c)
    total = part.sum(dim=0)  # (K + 1, C); split order is fixed
    return total[:K].t().contiguous().view(weight.shape), total[K].clone()  # (K, C) -> (C, 1, k, k); no aliasing


def _bias(bias, C):
    return None if bias is None else bias.reshape(C).float().contiguous()


def forward(x, weight, bias, mask):
    x, mask = x.contiguous(), mask.contiguous()
    N, H, W, C = x.shape
    y = _conv(x, None, mask, taps_transposed(weight, x), _bias(bias, C), weight.shape[-1], N * H * W, H, W)
    return y.view(x.shape)


def backward(dy, x, weight, mask):
    x, dy, mask = x.contiguous(), dy.contiguous(), mask.contiguous()
    N, H, W, C = x.shape
    R = N * H * W
    dx = _conv(dy, None, mask, taps_transposed(weight, x, flip=True), None, weight.shape[-1], R, H, W)
    return (dx.view(x.shape), *_wgrad(dy, x, None, mask, weight, R, H, W))


def rows_forward(feats, neighbours, weight, bias):
    feats, neighbours = feats.contiguous(), neighbours.contiguous()
    C = feats.shape[1]
    return _conv(feats, neighbours, None, taps_transposed(weight, feats), _bias(bias, C), weight.shape[-1],
                 neighbours.shape[0], 1, 1)


def rows_backward(dy, feats, neighbours, weight):
    feats, dy, neighbours = feats.contiguous(), dy.contiguous(), neighbours.contiguous()
    R = neighbours.shape[0]
    dfeats = _conv(dy, neighbours, None, taps_transposed(weight, feats, flip=True), None, weight.shape[-1], R, 1, 1)
    return (dfeats, *_wgrad(dy, feats, neighbours, None, weight, R, 1, 1))
