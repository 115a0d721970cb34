"""kfe::hog and kfe::hog_targets in Triton: one fused kernel, one read of the image, one write of the result.

Each program owns one work unit (engine/ops/hog/plan.py): a rectangle of UH x UW cells of one frame.
Its pixels are laid out cell-major as a (cells, pixels-per-cell) tile, so that the per-cell sums are
row sums. For every channel it loads the 8 Sobel neighbours of every pixel (reflect padding folded
into the indices; neighbours come from L1/L2, the image is read from memory once), computes the
gradient and magnitude, sums the magnitudes past each exact bin boundary (plan.py) per cell, which
gives the histograms as differences of nested sums (no per-bin one-hot pass), L2-normalises over the
bins and stores the cells at the unit's place in the output.

Precision: the gradients are float64 sums of the loaded values, exact for ordinary images (plan.py),
so that the bins are the reference's. Binning runs in fp32 on the rounded gradient and is then checked
in float64 against the two boundaries around the fp32 bin (rounding moves the angle by ~1e-7, far less
than a bin, so the fp32 bin is off by at most one): two float64 cross products per pixel instead of
nbins - 1, which keeps the float64 work small on GPUs with a slow float64 unit. Magnitudes, sums and
the normalisation are fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.ops._target import gpu
from engine.ops.hog import plan


@triton.jit
def _reflect(i, n):
    # Index into a row/column of length n after F.pad(mode="reflect") by 1: -1 -> 1, n -> n - 2.
    return tl.where(i < 0, -i, tl.where(i >= n, 2 * n - 2 - i, i))


@triton.jit
def _hog_kernel(
    x_ptr,      # (B, C, T, H, W) contiguous image, any float dtype
    out_ptr,    # fp32 output, addressed through the eight strides below
    table_ptr,  # (NBINS - 1, 4) float64 boundary constants [c_hi, c_lo, s_hi, s_lo] (plan.bin_table)
    gk_ptr,     # (GW * GW,) fp32 Gaussian window; read only when GW > 0
    index_ptr,  # (programs,) int64 unit ids; read only when HAS_INDEX
    C, T, H, W, h, w, nty, ntx,
    sK, sF, sTY, sTX, sC, sBin, sY, sX,
    NBINS: tl.constexpr, CELL: tl.constexpr, UH: tl.constexpr, UW: tl.constexpr, GW: tl.constexpr,
    HAS_INDEX: tl.constexpr, NB_P2: tl.constexpr, CELLS_P2: tl.constexpr, PIX_P2: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    if HAS_INDEX:
        unit = tl.load(index_ptr + k)
    else:
        unit = k
    f = unit // (nty * ntx)
    r = unit % (nty * ntx)
    ty = r // ntx
    tx = r % ntx
    plane = H.to(tl.int64) * W
    in_base = ((f // T) * C * T + f % T) * plane          # frame f = b*T + t, channel 0
    out_base = k * sK + f * sF + ty * sTY + tx * sTX

    cells = tl.arange(0, CELLS_P2)                        # cell-major tile: (CELLS_P2, PIX_P2)
    pix = tl.arange(0, PIX_P2)
    cy = ty * UH + cells // UW
    cx = tx * UW + cells % UW
    cell_ok = (cells < UH * UW) & (cy < h) & (cx < w)
    ok = cell_ok[:, None] & (pix < CELL * CELL)[None, :]
    y = cy[:, None] * CELL + (pix // CELL)[None, :]
    x = cx[:, None] * CELL + (pix % CELL)[None, :]
    y = tl.where(ok, y, 0)
    x = tl.where(ok, x, 0)
    rows_m, rows_0, rows_p = _reflect(y - 1, H) * W, y * W, _reflect(y + 1, H) * W
    cols_m, cols_p = _reflect(x - 1, W), _reflect(x + 1, W)
    if GW > 0:
        weight = tl.load(gk_ptr + (y % GW) * GW + x % GW, mask=ok, other=0.0)
    bins_id = tl.arange(0, NB_P2)

    for c in range(C):
        base = x_ptr + in_base + c * T * plane
        a = tl.load(base + rows_m + cols_m, mask=ok, other=0.0).to(tl.float64)
        b = tl.load(base + rows_m + x, mask=ok, other=0.0).to(tl.float64)
        d = tl.load(base + rows_m + cols_p, mask=ok, other=0.0).to(tl.float64)
        e = tl.load(base + rows_0 + cols_m, mask=ok, other=0.0).to(tl.float64)
        g = tl.load(base + rows_0 + cols_p, mask=ok, other=0.0).to(tl.float64)
        p = tl.load(base + rows_p + cols_m, mask=ok, other=0.0).to(tl.float64)
        q = tl.load(base + rows_p + x, mask=ok, other=0.0).to(tl.float64)
        s = tl.load(base + rows_p + cols_p, mask=ok, other=0.0).to(tl.float64)
        gx = (a - d) + 2.0 * (e - g) + (p - s)          # Kx = [[1,0,-1],[2,0,-2],[1,0,-1]]
        gy = (a + 2.0 * b + d) - (p + 2.0 * q + s)      # Ky = Kx^T
        # Exact bins (plan.py): fold (X, Y) = (gy, gx) into the upper half-plane; a pixel's bin is the
        # number of boundaries it lies on or past, and those sets are nested, so with S_j = sum of |g|
        # over the pixels past boundary j (S_0 = all), the histogram is hist[j] = S_j - S_{j+1}.
        flip = (gx < 0) | ((gx == 0) & (gy < 0))
        X = tl.where(flip, -gy, gy)                     # float64
        Y = tl.where(flip, -gx, gx)
        mag = tl.sqrt(X.to(tl.float32) * X.to(tl.float32) + Y.to(tl.float32) * Y.to(tl.float32))
        # Only the direction matters to the bin: an exact power-of-two scale keeps the fp32 copy clear of
        # under/overflow.
        size = tl.abs(X) + Y
        scale = tl.where(size < 2.0 ** -100, 2.0 ** 100, tl.where(size > 2.0 ** 100, 2.0 ** -100, 1.0))
        Xf = (X * scale).to(tl.float32)
        Yf = (Y * scale).to(tl.float32)
        if GW > 0:
            mag = mag * weight
        mag = tl.where(ok, mag, 0.0)
        nbin = tl.zeros([CELLS_P2, PIX_P2], tl.int32)   # fp32 estimate: number of boundaries passed
        for j in tl.static_range(NBINS - 1):
            c_hi = tl.load(table_ptr + 4 * j).to(tl.float32)  # heads exact, tails rounded (plan.bin_table)
            c_lo = tl.load(table_ptr + 4 * j + 1).to(tl.float32)
            s_hi = tl.load(table_ptr + 4 * j + 2).to(tl.float32)
            s_lo = tl.load(table_ptr + 4 * j + 3).to(tl.float32)
            nbin += (((c_hi * Yf - s_hi * Xf) + (c_lo * Yf - s_lo * Xf)) >= 0).to(tl.int32)
        # float64 check of boundary nbin (must be passed) and nbin + 1 (must not be), table rows
        # nbin - 1 and nbin; a clamped row is not used (no boundary 0 or nbins).
        lo = tl.maximum(nbin - 1, 0) * 4
        hi = tl.maximum(tl.minimum(nbin, NBINS - 2), 0) * 4
        below = ((tl.load(table_ptr + lo) * Y - tl.load(table_ptr + lo + 2) * X)
                 + (tl.load(table_ptr + lo + 1) * Y - tl.load(table_ptr + lo + 3) * X)) >= 0
        above = ((tl.load(table_ptr + hi) * Y - tl.load(table_ptr + hi + 2) * X)
                 + (tl.load(table_ptr + hi + 1) * Y - tl.load(table_ptr + hi + 3) * X)) >= 0
        nbin = nbin - ((nbin > 0) & ~below).to(tl.int32) + ((nbin < NBINS - 1) & above).to(tl.int32)
        s_prev = tl.sum(mag, axis=1)                        # (CELLS_P2,)
        hist = tl.zeros([NB_P2, CELLS_P2], tl.float32)
        for j in tl.static_range(NBINS - 1):
            s_next = tl.sum(tl.where(nbin > j, mag, 0.0), axis=1)
            hist = tl.where(bins_id[:, None] == j, (s_prev - s_next)[None, :], hist)
            s_prev = s_next
        hist = tl.where(bins_id[:, None] == NBINS - 1, s_prev[None, :], hist)  # (NB_P2, CELLS_P2)
        norm = tl.sqrt(tl.sum(hist * hist, axis=0))         # (CELLS_P2,)
        hist = hist / tl.maximum(norm, 1e-12)[None, :]
        cell_off = (cells // UW) * sY + (cells % UW) * sX
        offs = out_base + c * sC + bins_id[:, None] * sBin + cell_off[None, :]
        tl.store(out_ptr + offs, hist, mask=(bins_id < NBINS)[:, None] & cell_ok[None, :])


def _launch(x: torch.Tensor, units: plan.Units, nbins: int, gaussian_window: int, out: torch.Tensor) -> torch.Tensor:
    if units.count == 0:
        return out
    x = x.contiguous()
    table = plan.bin_table(nbins, torch.float64, x.device)
    gk = plan.gauss_table(gaussian_window, torch.float32, x.device)
    index = units.index if units.index is not None else table  # dummy pointer when unused
    _hog_kernel[(units.count,)](
        x, out, table, gk, index,
        units.C, units.T, units.H, units.W, units.h, units.w, units.nty, units.ntx, *units.strides,
        NBINS=nbins, CELL=units.cell, UH=units.uh, UW=units.uw, GW=gaussian_window,
        HAS_INDEX=units.index is not None, NB_P2=triton.next_power_of_2(nbins),
        CELLS_P2=triton.next_power_of_2(units.uh * units.uw), PIX_P2=triton.next_power_of_2(units.cell ** 2),
        num_warps=4)
    return out


def _hog_unit(x: torch.Tensor, cell: int) -> tuple[int, int]:
    """Cells per program for kfe::hog: 16x16-pixel tiles on a GPU; the interpreter wants few programs."""
    H, W = x.shape[-2:]
    if gpu(x.device) is None:
        return min(H // cell, 8), min(W // cell, 8)
    return max(1, 16 // cell), max(1, 16 // cell)


def hog_op(x, nbins, cell, gaussian_window):
    units = plan.hog_units(x, nbins, cell, *_hog_unit(x, cell))
    return _launch(x, units, nbins, gaussian_window, plan.empty_output(units, x.device))


def hog_targets_op(x, mask, patch, nbins, cell, gaussian_window):
    units = plan.token_units(x, mask, patch, nbins, cell)
    return _launch(x, units, nbins, gaussian_window, plan.empty_output(units, x.device))
