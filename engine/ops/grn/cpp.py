"""kfe::grn on the C++ CPU kernels of csrc/cpu/grn.cpp (engine._C)."""
from __future__ import annotations

import torch

from engine import _ext
from engine.ops import _alloc

_ext.require()  # registers torch.ops.kfe._grn_*_cpp


def _params(x: torch.Tensor, *params: torch.Tensor):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return acc, [p.reshape(-1).to(acc).contiguous() for p in params]


def forward(x, gamma, beta, mask, eps):
    x = x.contiguous()
    _, (gamma, beta) = _params(x, gamma, beta)
    y = _alloc.empty_like(x)
    torch.ops.kfe._grn_fwd_cpp(x, gamma, beta, None if mask is None else mask.contiguous(), eps, y)
    return y


def backward(dy, x, gamma, mask, eps):
    x, dy = x.contiguous(), dy.contiguous()
    acc, (gamma,) = _params(x, gamma)
    dx = _alloc.empty_like(x)
    dgamma, dbeta = (_alloc.empty(x.shape[-1], dtype=acc, device=x.device) for _ in range(2))
    torch.ops.kfe._grn_bwd_cpp(dy, x, gamma, None if mask is None else mask.contiguous(), eps, dx, dgamma, dbeta)
    return dx, dgamma, dbeta
