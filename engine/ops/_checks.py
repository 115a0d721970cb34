"""Input validation shared by the ops: errors that name the argument and what was expected."""
from __future__ import annotations

from typing import Sequence

import torch

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def tensor(name: str, t, *, ndim: int | None = None, dtypes: Sequence[torch.dtype] | None = FLOATS,
           layout: str = "") -> torch.Tensor:
    """Check that `t` is a tensor of rank `ndim` with one of `dtypes`; `layout` names the dims."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        what = f"{layout} " if layout else ""
        raise ValueError(f"{name} must be {what}{ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_dtype_names(dtypes)}; got {t.dtype}")
    return t


def same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")


def finite_positive(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (value >= 0) or value == float("inf"):
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    return float(value)
