"""kfe::hog / kfe::hog_targets on the C++ CPU kernel of csrc/cpu/hog.cpp (engine._C)."""
from __future__ import annotations

import torch

from engine import _ext
from engine.ops.hog import plan

_ext.require()  # registers torch.ops.kfe._hog_cpp


def _run(x, index, units, nbins, cell, gaussian_window, patch):
    x = x.contiguous()
    out = plan.empty_output(units, x.device, plan.math_dtype(x))
    f64 = torch.float64  # the kernel computes gradients and bins in double (plan.py)
    torch.ops.kfe._hog_cpp(x, plan.bin_table(nbins, f64, x.device), plan.gauss_table(gaussian_window, f64, x.device),
                           index, nbins, cell, gaussian_window, patch, out)
    return out


def hog_op(x, nbins, cell, gaussian_window):
    units = plan.hog_units(x, nbins, cell, 1, x.shape[-1] // cell)  # a task per row of cells
    return _run(x, None, units, nbins, cell, gaussian_window, 0)


def hog_targets_op(x, mask, patch, nbins, cell, gaussian_window):
    units = plan.token_units(x, mask, patch, nbins, cell)
    return _run(x, units.index, units, nbins, cell, gaussian_window, patch)
