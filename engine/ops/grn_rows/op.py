"""kfe::grn_rows: GRN on a sparse stage's rows, statistics per sample; entry, checks, registration."""
from __future__ import annotations

import torch

from engine import _ext
from engine.backend import FLOAT_DTYPES, Impl, OpBackends, register
from engine.ops import _checks

LOWP = (torch.float32, torch.float16, torch.bfloat16)


def _example(device: torch.device) -> tuple:
    x = torch.randn(10, 24, device=device)
    offsets = torch.tensor([0, 3, 10], device=device)
    return x, offsets, torch.zeros(24, device=device), torch.zeros(24, device=device), 1e-6


BACKENDS = register(OpBackends("grn_rows", example=_example))
BACKENDS.add(Impl("triton", "engine.ops.grn_rows.triton", dtypes=LOWP))
BACKENDS.add(Impl("cpp", "engine.ops.grn_rows.cpp", dtypes=FLOAT_DTYPES,
                  available=lambda: [] if _ext.has_op("_grn_rows_fwd_cpp") else ["engine._C has no grn_rows kernel"]))
BACKENDS.add(Impl("reference", "engine.ops.grn_rows.reference"))


@torch.library.custom_op("kfe::grn_rows", mutates_args=())
def _grn_rows(x: torch.Tensor, offsets: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
              eps: float) -> torch.Tensor:
    return BACKENDS.select(x).forward(x, offsets, gamma, beta, eps)


@_grn_rows.register_fake
def _grn_rows_fake(x, offsets, gamma, beta, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("kfe::grn_rows_backward", mutates_args=())
def _grn_rows_backward(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, gamma: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dgamma, dbeta = BACKENDS.select(x).backward(dy, x, offsets, gamma, eps)
    return dx, dgamma, dbeta


@_grn_rows_backward.register_fake
def _grn_rows_backward_fake(dy, x, offsets, gamma, eps):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    C = x.shape[-1]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(C, dtype=acc), x.new_empty(C, dtype=acc))


def _setup_context(ctx, inputs, output):
    x, offsets, gamma, beta, eps = inputs
    ctx.save_for_backward(x, offsets, gamma)
    ctx.eps = eps
    ctx.beta_meta = (beta.shape, beta.dtype)


def _backward(ctx, dy):
    x, offsets, gamma = ctx.saved_tensors
    dx, dgamma, dbeta = _grn_rows_backward(dy, x, offsets, gamma, ctx.eps)
    beta_shape, beta_dtype = ctx.beta_meta
    return (dx, None, dgamma.reshape(gamma.shape).to(gamma.dtype), dbeta.reshape(beta_shape).to(beta_dtype), None)


_grn_rows.register_autograd(_backward, setup_context=_setup_context)


def _check(x, offsets, gamma, beta, eps) -> None:
    _checks.tensor("x", x, ndim=2, layout="rows (V, C)")
    C = x.shape[-1]
    _checks.tensor("offsets", offsets, ndim=1, dtypes=(torch.int64,), layout="(N + 1,)")
    if offsets.shape[0] < 2:
        raise ValueError(f"offsets must be (N + 1,) with N >= 1 (first row of each sample, then V), "
                         f"got {tuple(offsets.shape)}")
    _checks.same_device("offsets", offsets, "x", x)
    for name, p in (("gamma", gamma), ("beta", beta)):
        _checks.tensor(name, p, dtypes=FLOAT_DTYPES)
        if p.numel() != C or p.shape not in ((C,), (1, 1, 1, C)):
            raise ValueError(f"{name} must have shape ({C},) or (1, 1, 1, {C}) for x of shape "
                             f"{tuple(x.shape)}, got {tuple(p.shape)}")
        _checks.same_device(name, p, "x", x)
    _checks.finite_positive("eps", eps)


def grn_rows(x: torch.Tensor, offsets: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
             eps: float = 1e-6) -> torch.Tensor:
    """GRN (ConvNeXt V2) of rows x (V, C) with each sample's statistics over its own rows.

    Args:
        x: (V, C) float32 / float16 / bfloat16 (float64 on the cpp and reference backends).
        offsets: (N + 1,) int64, sample n's rows are offsets[n]:offsets[n + 1], offsets[N] = V
            (engine.sparse.SparseStage.offsets; samples may have different row counts, or none).
        gamma, beta: C elements, (C,) or (1, 1, 1, C).

    Equal to engine.ops.grn with a mask, at the visible sites. Differentiable in x, gamma and beta.
    Offsets are trusted (not read on the host: no sync); the stage builds them.
    """
    _check(x, offsets, gamma, beta, eps)
    return _grn_rows(x, offsets, gamma, beta, float(eps))
