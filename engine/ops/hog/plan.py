"""What the fast paths of kfe::hog share: exact orientation binning, the Gaussian table, and the work units.

Binning without atan2. The reference bins phase = atan2(gx, gy) as floor(phase / pi * nbins) mod nbins.
With the point P = (X, Y) = (gy, gx) folded into the upper half-plane (P -> -P when Y < 0, or Y == 0
and X < 0: that is the "mod nbins" of the reference), the bin is the number of boundary directions
theta_k = k*pi/nbins, k = 1..nbins-1, that P lies on or past:

    bin = #{k : cos(theta_k) * Y - sin(theta_k) * X >= 0}

Exact gradients. Every path (the reference included) takes the Sobel sums in float64 of the input
values as given. A weighted sum of float32 (or fp16/bf16) values is exact in float64, in any order,
whenever the nonzero values of the 3x3 neighbourhood lie within 2^26 of each other in magnitude: every
ordinary image (raw 0..255, k/255 as ToTensor gives, mean/std normalised). So all paths see the same
gradient. In float32 they would not: its rounding exceeds the distance to a boundary often enough to
move 1-2% of the output values of a k/255 image (by up to 0.1).

Bins of an exact gradient. The reference bins with float64 atan2; the fast paths with the cross
products above, in float64 (C++ for double input; the final check elsewhere) or in float32 on the
gradient rounded to float32, with a guard: C++ re-bins in float64 every pixel whose float32 cross
product is within its error bound (~2^-21 |P|, checked at 2^-18) of zero; Triton and CUDA count the
bin in float32 and then check the two boundaries around it in float64 (float32 moves the angle by
~1e-7, a bin is pi/nbins wide). Each constant is split into a 12-bit head and a tail, c = c_hi + c_lo,
so that c_hi * Y is exact for short gradients (the k/256 images' are 11-bit integers / 256: float32
then errs by ~2^-35 |P| only). The boundaries with a rational slope (pi/2, pi/4, 3pi/4; even nbins)
use the exact directions (0, 1), (1, 1), (-1, 1) instead (only the direction matters), so gradients
exactly on them give a cross product of exactly 0, fused multiply-adds or not, and land on the upper
side as in the reference; the other boundaries have no exact ties. What remains is float64 rounding,
~1e-16 |P|, on both sides: a pixel whose orientation is that close to a boundary may be binned
differently by the reference's atan2 and by a fast path; none occurs in the tests (ordinary images,
and all 4.2M gradients of k/256 images, whose nearest approach is 3.1e-7 |P| for nbins = 9,
test_hog_bins.py). Magnitudes are float32 (float64 for float64 input): a nonzero gradient below ~1e-19
(inputs of that scale) has a float32 magnitude of 0.

Work units. A kernel program (Triton), task (C++) or block (CUDA) owns a rectangle of uh x uw cells of
one frame, all channels, and writes its normalised histograms at

    out[k*sK + f*sF + ty*sTY + tx*sTX + c*sC + bin*sBin + iy*sY + ix*sX]

for unit k = (frame f, unit row ty, unit col tx) and cell (iy, ix) inside it. The two layouts are
strides of that one formula: kfe::hog's (B, T, C, nbins, h, w) and kfe::hog_targets' (tokens, D), where
a unit is a token and, with a mask, program k computes the token index[k] and writes row k.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from engine.ops import _alloc

HEAD_BITS = 12


def _split(v: float) -> tuple[float, float]:
    """v = hi + lo with hi holding HEAD_BITS significant bits."""
    if v == 0.0:
        return 0.0, 0.0
    e = math.frexp(v)[1]
    hi = math.ldexp(round(math.ldexp(v, HEAD_BITS - e)), e - HEAD_BITS)
    return hi, v - hi


def boundaries(nbins: int) -> list[tuple[float, float]]:
    """Direction (cos, sin) of theta_k = k*pi/nbins for k = 1..nbins-1; exact, unnormalised, where the
    slope is rational (only the side of the boundary line matters)."""
    out = []
    for k in range(1, nbins):
        if 2 * k == nbins:
            out.append((0.0, 1.0))
        elif 4 * k in (nbins, 3 * nbins):
            out.append((1.0 if 4 * k == nbins else -1.0, 1.0))  # direction (+-1, 1): exact ties
        else:
            out.append((math.cos(k * math.pi / nbins), math.sin(k * math.pi / nbins)))
    return out


@functools.lru_cache(maxsize=None)
def _bin_table(nbins: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    rows = []
    for c, s in boundaries(nbins):
        c_hi, c_lo = _split(c)
        s_hi, s_lo = _split(s)
        rows.append((c_hi, c_lo, s_hi, s_lo))
    # fp32 tails are rounded once more; the heads are exact in either dtype.
    return torch.tensor(rows or [(0.0, 0.0, 0.0, 0.0)], dtype=dtype, device=device).reshape(-1, 4)


def bin_table(nbins: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(max(nbins - 1, 1), 4) rows [c_hi, c_lo, s_hi, s_lo] per boundary, in the kernel's math dtype."""
    return _bin_table(nbins, dtype, torch.device(device))


@functools.lru_cache(maxsize=None)
def _gauss_table(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    from engine.ops.hog.reference import gaussian_kernel

    return gaussian_kernel(max(size, 1), dtype, device).reshape(-1).contiguous()


def gauss_table(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The (size*size,) window of the reference, in the kernel's math dtype ((1,) dummy when size = 0)."""
    return _gauss_table(size, dtype, torch.device(device))


def math_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Units:
    """The work units of one call and where their cells go (see the module docstring)."""

    B: int
    C: int
    T: int
    H: int
    W: int
    cell: int
    uh: int                      # cells per unit, rows
    uw: int                      # cells per unit, columns
    nty: int                     # units per frame, rows
    ntx: int                     # units per frame, columns
    count: int                   # units to compute (programs / tasks / blocks)
    index: torch.Tensor | None   # (count,) int64 unit ids when only some are computed, else None
    strides: tuple[int, int, int, int, int, int, int, int]  # sK, sF, sTY, sTX, sC, sBin, sY, sX
    out_shape: tuple[int, ...]

    @property
    def h(self) -> int:
        return self.H // self.cell

    @property
    def w(self) -> int:
        return self.W // self.cell


def hog_units(x: torch.Tensor, nbins: int, cell: int, uh: int, uw: int) -> Units:
    """Units of uh x uw cells (the last row/column of units may be partial) for kfe::hog's output
    (B, T, C, nbins, h, w) of x (B, C, T, H, W)."""
    B, C, T, H, W = x.shape
    h, w = H // cell, W // cell
    nty, ntx = -(-h // uh), -(-w // uw)
    strides = (0, C * nbins * h * w, uh * w, uw, nbins * h * w, h * w, w, 1)
    return Units(B, C, T, H, W, cell, uh, uw, nty, ntx, B * T * nty * ntx, None, strides, (B, T, C, nbins, h, w))


def token_units(x: torch.Tensor, mask: torch.Tensor | None, patch: int, nbins: int, cell: int) -> Units:
    """One unit per patch x patch token (all of them, or the masked ones in row-major order)."""
    B, C, T, H, W = x.shape
    u = patch // cell
    nty, ntx = H // patch, W // patch
    D = C * nbins * u * u
    strides = (D, 0, 0, 0, nbins * u * u, u * u, u, 1)
    if mask is None:
        count = B * T * nty * ntx
        return Units(B, C, T, H, W, cell, u, u, nty, ntx, count, None, strides, (B, T * nty * ntx, D))
    # mask (B, T*Lf) flattened row-major numbers tokens exactly as units: b*T*Lf + t*Lf + r = f*Lf + r.
    index = mask.reshape(-1).nonzero().reshape(-1)
    return Units(B, C, T, H, W, cell, u, u, nty, ntx, index.numel(), index, strides, (index.numel(), D))


def empty_output(units: Units, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return _alloc.empty(units.out_shape, dtype=dtype, device=device)
