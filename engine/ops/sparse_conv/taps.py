"""Weight layout shared by the fast paths: the depthwise weight (C, 1, k, k) as taps (k*k, C).

Kernels read one tap for a block of channels at a time, so channels are the contiguous axis. The
input gradient of a submanifold conv is the same conv with the taps reversed (u is tap t of v iff v
is tap k*k-1-t of u), hence `flip`.
"""
from __future__ import annotations

import torch


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def taps_transposed(weight: torch.Tensor, x: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """(k*k, C) contiguous, in x's accumulation dtype; taps reversed when flip."""
    C = weight.shape[0]
    w = weight.reshape(C, -1)  # (C, K), taps row-major over the k x k window
    if flip:
        w = w.flip(1)
    return w.t().to(acc_dtype(x)).contiguous()
