"""kfe::hog / kfe::hog_targets on the CUDA C++ kernel of csrc/cuda/hog.cu.

Launched through engine._C (kfe::_hog_cuda) where setup.py compiled the CUDA sources, else JIT-compiled
with NVRTC through CuPy (engine/_cuda.py). Both launch on torch's current stream.
"""
from __future__ import annotations

import numpy as np
import torch

from engine import _cuda, _ext
from engine.ops.hog import plan

THREADS = 128
MAX_SHARED = 48 * 1024  # dynamic shared memory per block without opting in (cudaFuncSetAttribute)
_KERNELS = {torch.float32: ("kfe_hog_f32", 0), torch.float16: ("kfe_hog_f16", 1), torch.bfloat16: ("kfe_hog_bf16", 2)}


def _channels_per_block(C: int, nbins: int, cell: int, uh: int, uw: int) -> tuple[int, int]:
    """(channels per pass, dynamic shared memory bytes): as many channels as fit in 32 KiB, at most 4."""
    tile = (uh * cell + 2) * (uw * cell + 2)
    partial = uh * cell * uw * nbins + uh * uw * nbins  # row + cell histograms
    table = 4 * max(nbins - 1, 1)
    ch = max(1, min(C, 4, (32 * 1024 // 4 - table) // (tile + partial)))
    return ch, 4 * (table + ch * (tile + partial))


def _unit_cells(cell: int, patch: int | None) -> int:
    """Cells per side of a block's unit: a token for hog_targets, 16x16 pixels (or one cell) for hog."""
    return patch // cell if patch else max(1, 16 // cell)


def size_reasons(C: int, nbins: int, cell: int, patch: int | None = None) -> list[str]:
    """Why the kernel cannot run these sizes (empty if it can): even one channel per pass must fit the
    block's halo tile and histograms in MAX_SHARED. Needs no GPU (op.py's backend check)."""
    u = _unit_cells(cell, patch)
    smem = _channels_per_block(C, nbins, cell, u, u)[1]
    if smem <= MAX_SHARED:
        return []
    what = f"patch={patch}" if patch else "cell"
    return [f"shared memory {smem} B > {MAX_SHARED} B per block for nbins={nbins}, cell={cell}, {what} "
            f"(smaller nbins, cell or patch fit)"]


def launch_args(x: torch.Tensor, units: plan.Units, nbins: int, gaussian_window: int) -> dict:
    """Everything a launch of csrc/cuda/hog.cu needs (shared by both launch paths and the CPU emulation
    in tests/csrc): the kernel, its dtype code, the table and window, the 22 params and shared bytes."""
    table = plan.bin_table(nbins, torch.float64, x.device)  # the kernel's fp32 copy is made on the device
    gk = plan.gauss_table(gaussian_window, torch.float32, x.device)
    ch, smem = _channels_per_block(units.C, nbins, units.cell, units.uh, units.uw)
    params = [units.C, units.T, units.H, units.W, units.h, units.w, nbins, units.cell, gaussian_window,
              units.uh, units.uw, units.nty, units.ntx, *units.strides, ch]
    kernel, code = _KERNELS[x.dtype]
    return dict(kernel=kernel, dtype=code, table=table, gk=gk, params=params, shared_bytes=smem)


def _launch(x: torch.Tensor, units: plan.Units, nbins: int, gaussian_window: int) -> torch.Tensor:
    out = plan.empty_output(units, x.device)
    if units.count == 0:
        return out
    x = x.contiguous()
    a = launch_args(x, units, nbins, gaussian_window)
    if _ext.has_op("_hog_cuda"):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        torch.ops.kfe._hog_cuda(x, a["table"], a["gk"], units.index, a["params"], units.count, THREADS,
                                a["shared_bytes"], stream, out)
        return out
    p, i32, i64 = a["params"], np.int32, np.int64
    args = [x, out, a["table"], a["gk"], units.index, *(i32(v) for v in p[:11]), *(i64(v) for v in p[11:21]),
            i32(p[21])]
    _cuda.launch("hog", a["kernel"], (units.count,), (THREADS,), args, shared_mem=a["shared_bytes"], device=x.device)
    return out


def hog_op(x, nbins, cell, gaussian_window):
    u = _unit_cells(cell, None)
    return _launch(x, plan.hog_units(x, nbins, cell, u, u), nbins, gaussian_window)


def hog_targets_op(x, mask, patch, nbins, cell, gaussian_window):
    return _launch(x, plan.token_units(x, mask, patch, nbins, cell), nbins, gaussian_window)
