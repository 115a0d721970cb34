"""The GPU that the Triton config functions pick tiles for.

Every engine/ops/*/triton.py chooses its tile sizes, warps and stages from `gpu(device)`: None means
the interpreter (or a tensor off the GPU), which wants few, large programs; otherwise a `GpuTarget`
(compute capability, SM count). At run time that is the tensor's own GPU. `assume_gpu(target)` makes
every config function answer for that GPU instead, whatever the tensors' device and TRITON_INTERPRET:
that is how `python -m engine.bench.sm90` compiles the H200 configs on a machine without a GPU.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator

import torch

from engine.backend import triton_interpreting


@dataclass(frozen=True)
class GpuTarget:
    arch: int  # compute capability as major * 10 + minor (90 for H100 / H200)
    sm_count: int  # streaming multiprocessors: the split factors aim at a few programs per SM
    name: str = ""


H200 = GpuTarget(arch=90, sm_count=132, name="NVIDIA H200")

_assumed: list[GpuTarget] = []


@contextlib.contextmanager
def assume_gpu(target: GpuTarget) -> Iterator[None]:
    """Inside the block, config functions pick tiles for `target` whatever the inputs' device."""
    if not isinstance(target, GpuTarget):
        raise TypeError(f"assume_gpu(target) takes a GpuTarget, got {type(target).__name__}")
    _assumed.append(target)
    try:
        yield
    finally:
        _assumed.pop()


@functools.lru_cache(maxsize=None)
def _device_target(index: int) -> GpuTarget:
    props = torch.cuda.get_device_properties(index)
    return GpuTarget(props.major * 10 + props.minor, props.multi_processor_count, props.name)


def gpu(device: torch.device) -> GpuTarget | None:
    """The GPU to pick tiles for, or None for the interpreter's configs."""
    if _assumed:
        return _assumed[-1]
    if triton_interpreting() or device.type != "cuda":
        return None
    return _device_target(device.index or 0)
