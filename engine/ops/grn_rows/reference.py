"""GRN on rows grouped by sample: the spec, and the reference backend of kfe::grn_rows.

Rows x (V, C) are the visible sites of N samples, sample n's rows being offsets[n]:offsets[n + 1]
(engine.sparse.SparseStage). GRN (ConvNeXt V2, arXiv 2301.00808, Alg. 1) with the statistics of each
sample over its own rows, which is engine.ops.grn.reference.grn with a mask at the visible sites:

    Gx[n, c] = || x[rows of n, c] ||_2,   Nx = Gx / (mean_c Gx + eps),   y = gamma * (x * Nx) + beta + x

Sums run in float32 (float64 for float64 input).
"""
from __future__ import annotations

import torch


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def sample_of_rows(offsets: torch.Tensor, V: int) -> torch.Tensor:
    """(V,) int64 sample of each row (no host sync: the size is given)."""
    return torch.searchsorted(offsets[1:], torch.arange(V, device=offsets.device), right=True)


def _stats(xf, sample, N, eps):
    sq = xf.new_zeros(N, xf.shape[1]).index_add(0, sample, xf * xf)   # (N, C)
    gx = torch.where(sq > 0, torch.where(sq > 0, sq, 1).sqrt(), 0)   # ||.||_2, subgradient 0 at 0
    denom = gx.mean(dim=-1, keepdim=True) + eps                        # (N, 1)
    return gx, denom


def forward(x, offsets, gamma, beta, eps):
    acc = _acc_dtype(x)
    V, C = x.shape
    N = offsets.shape[0] - 1
    xf = x.to(acc)
    sample = sample_of_rows(offsets, V)
    gx, denom = _stats(xf, sample, N, eps)
    nx = gx / denom
    y = gamma.reshape(C).to(acc) * (xf * nx[sample]) + beta.reshape(C).to(acc) + xf
    return y.to(x.dtype).contiguous()


def backward(dy, x, offsets, gamma, eps):
    """(dx, dgamma (C,), dbeta (C,)); dgamma / dbeta in the accumulation dtype."""
    acc = _acc_dtype(x)
    V, C = x.shape
    N = offsets.shape[0] - 1
    xf, g = x.to(acc), dy.to(acc)
    gam = gamma.reshape(C).to(acc)
    sample = sample_of_rows(offsets, V)
    gx, denom = _stats(xf, sample, N, eps)
    nx = gx / denom
    s = xf.new_zeros(N, C).index_add(0, sample, g * xf)                # dL/dNx / gamma
    dnx = gam * s
    dgx = dnx / denom - (dnx * gx).sum(dim=-1, keepdim=True) / (denom * denom * C)
    shift = torch.where(gx > 0, dgx / torch.where(gx > 0, gx, 1), 0)   # dGx/dx = x / Gx, 0 at Gx = 0
    dx = g * (1 + gam * nx[sample]) + xf * shift[sample]
    return dx.to(x.dtype).contiguous(), (s * nx).sum(dim=0), g.sum(dim=0)
