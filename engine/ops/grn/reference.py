"""GRN, Global Response Normalization (ConvNeXt V2, arXiv 2301.00808, Sec. 3.2 and Alg. 1): the spec.

For channels-last x of shape (N, H, W, C):

    Gx[n, c] = || x[n, :, :, c] ||_2                    global aggregation (per sample and channel)
    Nx[n, c] = Gx[n, c] / (mean_c Gx[n, c] + eps)        divisive normalization across channels
    y        = gamma * (x * Nx) + beta + x               calibration with a residual

With a mask (N, H, W), True = visible, as the sparse FCMAE encoder uses it: Gx sums over the visible
sites of each sample only (per sample; MinkowskiEngine's GRN pools the whole batch), and y is
exactly 0 at masked sites. Sums run in float32 (float64 for float64 input).
"""
from __future__ import annotations

import torch


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _visible(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else torch.where(mask[..., None], x, 0)


def grn(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, mask: torch.Tensor | None = None,
        eps: float = 1e-6) -> torch.Tensor:
    """y for x (N, H, W, C); gamma and beta hold C elements. Differentiable (autograd is the spec)."""
    acc = _acc_dtype(x)
    C = x.shape[-1]
    xf = _visible(x.to(acc), mask)
    gx = torch.linalg.vector_norm(xf, dim=(1, 2), keepdim=True)  # (N, 1, 1, C); subgradient 0 at 0
    nx = gx / (gx.mean(dim=-1, keepdim=True) + eps)
    y = gamma.reshape(C).to(acc) * (xf * nx) + beta.reshape(C).to(acc) + xf
    return _visible(y, mask).to(x.dtype)


# The two functions below are the reference *backend* of kfe::grn: the same math, with the backward
# written out (what the fast paths implement) instead of left to autograd.
def forward(x, gamma, beta, mask, eps):
    return grn(x, gamma, beta, mask, eps).contiguous()


def backward(dy, x, gamma, mask, eps):
    """(dx, dgamma (C,), dbeta (C,)) for upstream gradient dy; dgamma/dbeta in the accumulation dtype."""
    acc = _acc_dtype(x)
    C = x.shape[-1]
    xf, g = _visible(x.to(acc), mask), _visible(dy.to(acc), mask)
    gam = gamma.reshape(C).to(acc)
    gx = torch.linalg.vector_norm(xf, dim=(1, 2), keepdim=True)  # (N, 1, 1, C)
    denom = gx.mean(dim=-1, keepdim=True) + eps                   # (N, 1, 1, 1)
    nx = gx / denom
    s = (g * xf).sum(dim=(1, 2), keepdim=True)                    # (N, 1, 1, C): dL/dNx / gamma
    dnx = gam * s
    dgx = dnx / denom - (dnx * gx).sum(dim=-1, keepdim=True) / (denom * denom * C)
    shift = torch.where(gx > 0, dgx / torch.where(gx > 0, gx, 1), 0)  # dGx/dx = x / Gx, 0 at Gx = 0
    dx = g * (1 + gam * nx) + xf * shift
    return dx.to(x.dtype).contiguous(), (s * nx).sum(dim=(0, 1, 2)), g.sum(dim=(0, 1, 2))
