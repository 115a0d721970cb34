"""The exact orientation binning of the HOG fast paths (engine/ops/hog/plan.py), checked exhaustively.

Every gradient an image of k/256 values (k = 0..256) can produce is (X, Y) / 256 with integers
|X|, |Y| <= 1024 (Sobel weights sum to 4 per side). For all 4.2M of them the boundary test the kernels
run (fp32 products and sums, with or without fused multiply-adds) must give the bin that the float64
reference computes with atan2. NumPy's float32 arithmetic rounds each operation like the kernels do.
"""
import math

import numpy as np
import pytest
import torch

from engine.ops.hog import plan

R = 1024


@pytest.fixture(scope="module")
def gradients():
    v = np.arange(-R, R + 1, dtype=np.float64)
    gx, gy = np.repeat(v, v.size), np.tile(v, v.size)
    keep = (gx != 0) | (gy != 0)  # zero gradients have zero magnitude: their bin is irrelevant
    return gx[keep], gy[keep]


def reference_bins(gx, gy, nbins):
    phase = torch.atan2(torch.from_numpy(gx), torch.from_numpy(gy)) / math.pi * nbins
    return (phase.floor().long() % nbins).numpy()


def kernel_bins(gx, gy, nbins, fma: bool):
    """The kernels' arithmetic: fold (X, Y) = (gy, gx), then count (c_hi Y - s_hi X) + (c_lo Y - s_lo X) >= 0."""
    f32 = np.float32
    gx32, gy32 = gx.astype(f32), gy.astype(f32)
    flip = (gx32 < 0) | ((gx32 == 0) & (gy32 < 0))
    Y, X = np.where(flip, -gx32, gx32), np.where(flip, -gy32, gy32)
    bins = np.zeros(gx.shape, np.int64)
    for c_hi, c_lo, s_hi, s_lo in plan.bin_table(nbins, torch.float32, "cpu").tolist()[: nbins - 1]:
        c_hi, c_lo, s_hi, s_lo = f32(c_hi), f32(c_lo), f32(s_hi), f32(s_lo)
        if fma:  # fma(c, Y, -(s * X)): c * Y exact in float64 (24 + 11 bits), one rounding at the end
            hi = (c_hi.astype(np.float64) * Y - (s_hi * X).astype(np.float64)).astype(f32)
            lo = (c_lo.astype(np.float64) * Y - (s_lo * X).astype(np.float64)).astype(f32)
        else:
            hi, lo = c_hi * Y - s_hi * X, c_lo * Y - s_lo * X
        bins += (hi + lo) >= 0
    return bins


@pytest.mark.parametrize("nbins", [9, 8, 4, 6, 2])
@pytest.mark.parametrize("fma", [False, True], ids=["mul-add", "fma"])
def test_kernel_binning_equals_float64_atan2(gradients, nbins, fma):
    gx, gy = gradients
    got, want = kernel_bins(gx, gy, nbins, fma), reference_bins(gx, gy, nbins)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"{bad.size} gradients binned differently, e.g. {list(zip(gx[bad[:5]], gy[bad[:5]]))}"


def test_margin_claimed_in_plan_docstring(gradients):
    # The smallest |sin(angle to the nearest boundary)| over this domain, for nbins = 9: the head room
    # the fp32 evaluation has (its error is below 2^-35 |P| with the split constants).
    gx, gy = gradients
    phase = np.arctan2(gx, gy) / math.pi * 9
    margin = np.abs(np.sin((phase - np.round(phase)) * math.pi / 9))
    margin = margin[np.round(phase) % 9 != 0]  # boundaries 0 / pi are decided by the fold, exactly
    assert 3.0e-7 < margin.min() < 3.2e-7


def test_table_heads_are_exact_12_bit_numbers():
    for nbins in (9, 7, 12):
        table = plan.bin_table(nbins, torch.float64, "cpu")
        assert table.shape == (nbins - 1, 4)
        for k, (c_hi, c_lo, s_hi, s_lo) in enumerate(table.tolist(), start=1):
            for head in (c_hi, s_hi):
                assert head == 0 or float(np.ldexp(head, plan.HEAD_BITS - math.frexp(head)[1])).is_integer()
            theta = k * math.pi / nbins
            if 4 * k in (nbins, 3 * nbins) or 2 * k == nbins:  # exact direction vectors
                assert c_lo == s_lo == 0 and abs(c_hi) in (0.0, 1.0) and s_hi == 1.0
                assert math.isclose(math.atan2(s_hi, c_hi), theta)
            else:
                assert abs(c_hi + c_lo - math.cos(theta)) < 1e-16 and abs(s_hi + s_lo - math.sin(theta)) < 1e-16
