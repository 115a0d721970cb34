"""Run-time compilation of the CUDA kernels in csrc/cuda/*.cu through CuPy (NVRTC).

Every kernel file is plain `extern "C" __global__` code on raw pointers (no ATen/c10 headers; host code
sits behind `#if !defined(__CUDACC_RTC__)`), so where engine._C was built without CUDA the same source is
compiled here on first use and launched on torch's current stream with the tensors' data pointers:

    from engine import _cuda
    _cuda.launch("hog", "kfe_hog_f32", grid=(n,), block=(128,), args=(x, out, np.int32(C), ...))

Arguments: torch tensors (or None) become device pointers; numbers must be numpy scalars of the exact C
type the kernel declares (np.int32, np.int64, np.float32): a bare Python int would be ambiguous.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

SOURCES = Path(__file__).resolve().parent.parent / "csrc" / "cuda"


def source(name: str) -> Path:
    return SOURCES / f"{name}.cu"


def runtime_reasons(name: str) -> list[str]:
    """Why csrc/cuda/<name>.cu cannot be compiled at run time here ([] if it can)."""
    why = []
    if importlib.util.find_spec("cupy") is None:
        why.append("cupy is not installed (it JIT-compiles csrc/cuda/*.cu; pip install cupy-cuda13x)")
    if not source(name).is_file():
        why.append(f"CUDA source {source(name)} not found (installed without the csrc/ tree)")
    return why


@functools.lru_cache(maxsize=None)
def module(name: str, device_index: int):
    """The compiled RawModule of csrc/cuda/<name>.cu on one device (compiled once per process)."""
    import cupy

    with cupy.cuda.Device(device_index):
        mod = cupy.RawModule(code=source(name).read_text(), options=("--std=c++17",))
        mod.compile()
    return mod


def _arg(value):
    if value is None:
        return np.uint64(0)
    if isinstance(value, torch.Tensor):
        if value.device.type != "cuda":
            raise ValueError(f"kernel argument on {value.device}; CUDA kernels take CUDA tensors")
        return np.uint64(value.data_ptr())
    if isinstance(value, np.generic):
        return value
    raise TypeError(f"kernel arguments are tensors, None or numpy scalars (np.int32, ...), got {type(value).__name__}")


def launch(name: str, kernel: str, grid: Sequence[int], block: Sequence[int], args: Sequence, *,
           shared_mem: int = 0, device: torch.device | None = None) -> None:
    """Launch `kernel` of csrc/cuda/<name>.cu on torch's current stream of `device` (default: current)."""
    import cupy

    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(index).cuda_stream, index)
    with cupy.cuda.Device(index), stream:
        fn = module(name, index).get_function(kernel)  # loaded on this device
        fn(tuple(grid), tuple(block), tuple(_arg(a) for a in args), shared_mem=shared_mem)
