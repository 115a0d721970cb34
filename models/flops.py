"""Counting a model's multiply-accumulates (the papers' "FLOPs") with torch.utils.flop_counter.

FlopCounterMode counts 2 FLOPs per MAC for matmuls and convolutions (and for custom ops that register
a formula, e.g. kfe::attention); elementwise work (norms, activations, GRN) is not counted, as in the
papers' fvcore-based numbers.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: nn.Module, input_shape: Sequence[int] | None = None, *, inputs: tuple | None = None,
                device: str | torch.device = "meta") -> int:
    """Multiply-accumulates of one forward pass on a batch of `input_shape` (or explicit `inputs`).

    Runs on the meta device by default (no memory, no time); pass device="cpu" for models whose
    forward depends on values.
    """
    if (input_shape is None) == (inputs is None):
        raise ValueError("give exactly one of input_shape or inputs")
    device = torch.device(device)
    if device.type == "meta":
        model = _to_meta(model)
    if inputs is None:
        inputs = (torch.zeros(tuple(input_shape), device=device),)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops() // 2


def _to_meta(model: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(model) if any(p.device.type != "meta" for p in model.parameters()) else model
    return clone.to("meta")
