"""Output allocation for every fast path, with an optional poison fill for tests.

Kernels must write every element of their outputs. Under `poison_outputs()` each buffer starts as
NaN (floats) or -1 (integers), so an element a kernel forgets to write shows up in the comparison
against the reference instead of passing by luck on zero-filled memory.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_poison = [False]


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    previous, _poison[0] = _poison[0], True
    try:
        yield
    finally:
        _poison[0] = previous


def empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison[0]:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return empty(t.shape, dtype=dtype or t.dtype, device=t.device)
