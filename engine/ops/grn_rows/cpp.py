"""kfe::grn_rows on the C++ CPU kernels of csrc/cpu/grn_rows.cpp (engine._C)."""
from __future__ import annotations

import torch

from engine import _ext
from engine.ops import _alloc

_ext.require()  # registers torch.ops.kfe._grn_rows_*_cpp


def _params(x: torch.Tensor, *params: torch.Tensor):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return acc, [p.reshape(-1).to(acc).contiguous() for p in params]


def forward(x, offsets, gamma, beta, eps):
    x = x.contiguous()
    _, (gamma, beta) = _params(x, gamma, beta)
    y = _alloc.empty_like(x)
    torch.ops.kfe._grn_rows_fwd_cpp(x, offsets.contiguous(), gamma, beta, eps, y)
    return y


def backward(dy, x, offsets, gamma, eps):
    x, dy = x.contiguous(), dy.contiguous()
    acc, (gamma,) = _params(x, gamma)
    N, C = offsets.shape[0] - 1, x.shape[1]
    dx = _alloc.empty_like(x)
    dgamma, dbeta = (_alloc.empty((N, C), dtype=acc, device=x.device) for _ in range(2))
    torch.ops.kfe._grn_rows_bwd_cpp(dy, x, offsets.contiguous(), gamma, eps, dx, dgamma, dbeta)
    return dx, dgamma.sum(dim=0), dbeta.sum(dim=0)
