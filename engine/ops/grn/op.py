"""kfe::grn: the public entry, input checks, custom-op registration (fake + autograd) and dispatch."""
from __future__ import annotations

from typing import Optional

import torch

from engine import _ext
from engine.backend import FLOAT_DTYPES, Impl, OpBackends, register
from engine.ops import _checks

LOWP = (torch.float32, torch.float16, torch.bfloat16)


def _example(device: torch.device) -> tuple:
    x = torch.randn(2, 7, 7, 40, device=device)
    return x, torch.zeros(40, device=device), torch.zeros(40, device=device), None, 1e-6


BACKENDS = register(OpBackends("grn", example=_example))
BACKENDS.add(Impl("triton", "engine.ops.grn.triton", dtypes=LOWP))
BACKENDS.add(Impl("cpp", "engine.ops.grn.cpp", dtypes=FLOAT_DTYPES,
                  available=lambda: [] if _ext.has_op("_grn_fwd_cpp") else ["engine._C has no GRN kernel"]))
BACKENDS.add(Impl("reference", "engine.ops.grn.reference"))


@torch.library.custom_op("kfe::grn", mutates_args=())
def _grn(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, mask: Optional[torch.Tensor],
         eps: float) -> torch.Tensor:
    return BACKENDS.select(x).forward(x, gamma, beta, mask, eps)


@_grn.register_fake
def _grn_fake(x, gamma, beta, mask, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("kfe::grn_backward", mutates_args=())
def _grn_backward(dy: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, mask: Optional[torch.Tensor],
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dgamma, dbeta = BACKENDS.select(x).backward(dy, x, gamma, mask, eps)
    return dx, dgamma, dbeta


@_grn_backward.register_fake
def _grn_backward_fake(dy, x, gamma, mask, eps):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    C = x.shape[-1]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(C, dtype=acc), x.new_empty(C, dtype=acc))


def _setup_context(ctx, inputs, output):
    x, gamma, beta, mask, eps = inputs
    ctx.save_for_backward(x, gamma, mask)
    ctx.eps = eps
    ctx.beta_meta = (beta.shape, beta.dtype)


def _backward(ctx, dy):
    x, gamma, mask = ctx.saved_tensors
    dx, dgamma, dbeta = _grn_backward(dy, x, gamma, mask, ctx.eps)
    beta_shape, beta_dtype = ctx.beta_meta
    return (dx, dgamma.reshape(gamma.shape).to(gamma.dtype), dbeta.reshape(beta_shape).to(beta_dtype),
            None, None)


_grn.register_autograd(_backward, setup_context=_setup_context)


def _check(x, gamma, beta, mask, eps) -> None:
    _checks.tensor("x", x, ndim=4, layout="channels-last (N, H, W, C)")
    C = x.shape[-1]
    for name, p in (("gamma", gamma), ("beta", beta)):
        _checks.tensor(name, p, dtypes=FLOAT_DTYPES)
        if p.numel() != C or p.shape not in ((C,), (1, 1, 1, C)):
            raise ValueError(f"{name} must have shape ({C},) or (1, 1, 1, {C}) for x of shape "
                             f"{tuple(x.shape)}, got {tuple(p.shape)}")
        _checks.same_device(name, p, "x", x)
    if mask is not None:
        _checks.tensor("mask", mask, dtypes=(torch.bool,))
        if mask.shape != x.shape[:3]:
            raise ValueError(f"mask must be (N, H, W) = {tuple(x.shape[:3])} (True = visible), "
                             f"got {tuple(mask.shape)}")
        _checks.same_device("mask", mask, "x", x)
    _checks.finite_positive("eps", eps)


def grn(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, mask: torch.Tensor | None = None,
        eps: float = 1e-6) -> torch.Tensor:
    """Global Response Normalization (ConvNeXt V2) of channels-last x.

    Args:
        x: (N, H, W, C), float32 / float16 / bfloat16 (float64 on the cpp and reference backends).
        gamma, beta: C elements, shaped (C,) or (1, 1, 1, C); any float dtype.
        mask: optional bool (N, H, W), True = visible. Statistics are taken over each sample's visible
            sites only, and the output is exactly 0 at masked sites (the sparse FCMAE encoder).
        eps: added to the channel mean of Gx.

    Returns y with x's shape and dtype: gamma * (x * Nx) + beta + x, Nx = Gx / (mean_c Gx + eps),
    Gx = ||x||_2 over (H, W). Sums run in float32. Differentiable in x, gamma and beta.
    """
    _check(x, gamma, beta, mask, eps)
    return _grn(x, gamma, beta, mask, float(eps))
