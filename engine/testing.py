"""Checking a fast path against its reference: the harness every op's tests use.

    from engine import testing
    for backend in testing.backends("grn"):              # those this machine can run
        testing.check_against_reference(
            engine.ops.grn, reference.grn, (x, gamma, beta, mask), grad=(0, 1, 2), backend=backend)

check_against_reference runs the op on the given inputs under one backend with every output buffer
poisoned (NaN), runs the reference on the same values in float64, and compares the outputs and the
gradients for one random upstream gradient, with the tolerance of the inputs' dtype.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from engine import backend as _backend
from engine.ops._alloc import poison_outputs

# (rtol, atol): |actual - expected| <= atol * scale + rtol * |expected|, where scale is the largest
# |expected| of the tensor (at least 1), so atol is relative to the tensor's magnitude. fp32 is held
# to 1e-5 of a float64 reference; fp16 and bf16 to what rounding the output to them costs.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def backends(op: str, device: str | torch.device = "cpu") -> list[str]:
    """Backends of `op` that can run here when forced, judged on the op's example inputs."""
    table = _backend.REGISTRY[op]
    x = table.example(torch.device(device))[0]
    return [name for name, impl in table.impls.items() if not impl.reasons(x, forced=True)]


def supported_dtypes(op: str, backend: str) -> tuple[torch.dtype, ...]:
    return _backend.REGISTRY[op].impls[backend].dtypes


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "output",
                 scale: float | None = None) -> None:
    """actual (any dtype) against a float64 expected, within TOLERANCES[dtype]; NaNs must coincide."""
    rtol, atol = TOLERANCES[dtype]
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    nan_a, nan_e = a.isnan(), e.isnan()
    if not torch.equal(nan_a, nan_e):
        where = (nan_a != nan_e).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: NaN pattern differs from the reference at {where} (first 5); "
                             "a NaN in the output often means an element the kernel never wrote")
    a, e = a[~nan_e], e[~nan_e]
    if e.numel() == 0:
        return
    if scale is None:
        scale = max(1.0, e.abs().max().item())
    err = (a - e).abs()
    bound = atol * scale + rtol * e.abs()
    if not bool((err <= bound).all()):
        i = int((err - bound).argmax())
        raise AssertionError(f"{name} ({dtype}): max error {err.max().item():.3g}; worst element "
                             f"{a[i].item():.9g} vs {e[i].item():.9g} (bound {bound[i].item():.3g}, "
                             f"rtol {rtol}, atol {atol} x scale {scale:.3g})")


def _float64(arg):
    if isinstance(arg, torch.Tensor) and arg.is_floating_point():
        return arg.detach().double()
    return arg


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def check_against_reference(fn: Callable, reference: Callable, args: Sequence, *, grad: Sequence[int] = (),
                            backend: str = "auto", dtype: torch.dtype | None = None, kwargs: dict | None = None,
                            seed: int = 0) -> None:
    """fn(*args) under `backend` (outputs poisoned) against reference(*args in float64).

    grad: positions of the args to differentiate; both sides get the same upstream gradient (random,
    rounded to the output dtype). dtype: which tolerance applies (default: the first tensor arg's).
    """
    kwargs = kwargs or {}
    if dtype is None:
        dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
    fast_args = [a.detach().clone().requires_grad_(i in grad) if i in grad else a for i, a in enumerate(args)]
    ref_args = [_float64(a).requires_grad_(True) if i in grad else _float64(a) for i, a in enumerate(args)]

    with _backend.use_backend(backend), poison_outputs():
        out = _as_tuple(fn(*fast_args, **kwargs))
    expected = _as_tuple(reference(*ref_args, **kwargs))
    for k, (o, e) in enumerate(zip(out, expected)):
        assert_close(o, e, dtype, name=f"output {k} [{backend}]")
    if not grad:
        return

    gen = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in out]
    with _backend.use_backend(backend), poison_outputs():
        got = torch.autograd.grad(out, [fast_args[i] for i in grad], [u.to(o.device) for u, o in zip(upstream, out)],
                                  allow_unused=True)
    want = torch.autograd.grad(expected, [ref_args[i] for i in grad], [u.double() for u in upstream],
                               allow_unused=True)
    for i, g, w in zip(grad, got, want):
        if w is None:
            assert g is None or not g.any(), f"grad of arg {i} should be zero"
            continue
        if g is None:
            raise AssertionError(f"grad of arg {i} [{backend}] is missing")
        if g.shape != args[i].shape or g.dtype != args[i].dtype:
            raise AssertionError(f"grad of arg {i}: {tuple(g.shape)} {g.dtype}, expected the arg's "
                                 f"{tuple(args[i].shape)} {args[i].dtype}")
        # A gradient stored in a coarser dtype than the computation is held to that dtype's tolerance.
        tol = max(dtype, g.dtype, key=lambda d: TOLERANCES.get(d, (0.0, 0.0)))
        assert_close(g, w, tol, name=f"grad of arg {i} [{backend}]")


def expect_error(exc: type[Exception], fn: Callable, *words: str) -> Exception:
    """fn() must raise `exc` whose message contains every word (typically the argument's name)."""
    try:
        fn()
    except exc as err:
        missing = [w for w in words if w not in str(err)]
        if missing:
            raise AssertionError(f"{exc.__name__} message lacks {missing}: {err}") from err
        return err
    raise AssertionError(f"expected {exc.__name__} mentioning {list(words)}, nothing was raised")
