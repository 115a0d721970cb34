"""Counting a model's multiply-accumulates (the papers' "FLOPs") with torch.utils.flop_counter.

FlopCounterMode counts 2 FLOPs per MAC for matmuls and convolutions (and for custom ops that register
a formula: kfe::attention, kfe::sparse_dwconv2d[_rows]); elementwise work (norms, activations, GRN)
is not counted, as in the papers' fvcore-based numbers.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: nn.Module, input_shape: Sequence[int] | None = None, *, inputs: tuple | None = None,
                device: str | torch.device = "meta") -> int:
    """Multiply-accumulates of one forward pass on a batch of `input_shape` (or explicit `inputs`).

    Runs on the meta device by default (no memory, no time). Models whose forward needs values (the
    FCMAE encoder builds its sparse stages with nonzero / tolist from the random mask) cannot run
    there: they are counted by a real run on the CPU instead (weights zeroed when the model has none,
    meta inputs replaced by zeros of their shape and dtype), or pass device="cpu" directly.
    """
    if (input_shape is None) == (inputs is None):
        raise ValueError("give exactly one of input_shape or inputs")
    device = torch.device(device)
    if inputs is None:
        inputs = (torch.zeros(tuple(input_shape), device=device),)
    if device.type != "meta":
        return _count(model, inputs)
    try:
        return _count(_to_meta(model), tuple(_meta(v) for v in inputs))
    except (NotImplementedError, RuntimeError) as err:
        if "meta" not in str(err):
            raise
    # A value-dependent op on the meta device (e.g. torch.nonzero): count a real CPU run instead.
    return _count(_to_cpu(model), tuple(_cpu(v) for v in inputs))


def _count(model: nn.Module, inputs: tuple) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops() // 2


def _has_values(model: nn.Module) -> bool:
    return all(t.device.type != "meta" for t in (*model.parameters(), *model.buffers()))


def _to_meta(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model) if any(p.device.type != "meta" for p in model.parameters()) else model
    return clone.to("meta")


def _to_cpu(model: nn.Module) -> nn.Module:
    if _has_values(model):
        return copy.deepcopy(model).to("cpu")
    clone = copy.deepcopy(model).to_empty(device="cpu")
    with torch.no_grad():  # deterministic stand-in values: only shapes matter to the count
        for t in (*clone.parameters(), *clone.buffers()):
            t.zero_()
    return clone


def _meta(v):
    return v.to("meta") if isinstance(v, torch.Tensor) else v


def _cpu(v):
    if not isinstance(v, torch.Tensor):
        return v
    return torch.zeros(v.shape, dtype=v.dtype) if v.device.type == "meta" else v.to("cpu")
