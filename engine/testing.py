"""Checking a fast path against its reference: the harness every op's tests use (CPU and GPU).

    from engine import testing
    for backend in testing.fast_backends("grn"):         # the fast paths this machine can run
        testing.check_against_reference(
            engine.ops.grn, reference.grn, (x, gamma, beta, mask), grad=(0, 1, 2), backend=backend)

check_against_reference runs the op on the given inputs under one backend with every output buffer
poisoned (NaN), runs the reference on the same values in float64, and compares the outputs and the
gradients for one random upstream gradient with the limits of the inputs' dtype (LIMITS). It also
asserts which backend ran: the forced one, or `expect` under auto (on CUDA, auto must be told).

Two limits per tensor, both from the dtype:
  norm     ||out - ref|| / ||ref||                          <= LIMITS[dtype].norm
  element  |out_i - ref_i| / (|ref_i| + ||ref|| / sqrt(n))  <= LIMITS[dtype].element
The norm bounds the error as a whole, whatever the tensor's magnitude (a gradient of 1e-4 is held to
1e-2 of itself in bf16, not to an absolute floor that zero would pass). The element bound catches the
one wrong element among 10^6 that the norm averages away: it is relative to the element itself or
to the tensor's root-mean-square, whichever is larger, so tiny elements are not held to their own size.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from engine import backend as _backend
from engine.ops._alloc import poison_outputs


@dataclass(frozen=True)
class Limit:
    norm: float     # ||out - ref|| / ||ref||
    element: float  # |out_i - ref_i| / (|ref_i| + rms(ref))


# What computing in the dtype costs against a float64 reference (DESIGN.md section 3): fp32 is held
# to 1e-5, tf32 matmuls to 1e-3, fp16 to 1e-3 and bf16 to 1e-2 (8 bits of mantissa: 2^-9 per
# rounding, a few roundings per result). The element limits leave room for the rounding of one
# element next to the norm's average, and stay far below a wrong element (|error| ~ |ref_i| + rms).
LIMITS: dict[object, Limit] = {
    torch.float64: Limit(1e-12, 1e-10),
    torch.float32: Limit(1e-5, 1e-4),
    "tf32": Limit(1e-3, 1e-2),
    torch.float16: Limit(1e-3, 1e-2),
    torch.bfloat16: Limit(1e-2, 6e-2),
}


def limit_of(dtype) -> Limit:
    if dtype not in LIMITS:
        raise KeyError(f"no accuracy limit for {dtype}; known: {list(LIMITS)}")
    return LIMITS[dtype]


def _coarser(a, b):
    """The dtype (or 'tf32') with the looser limits."""
    return max(a, b, key=lambda d: LIMITS[d].norm)


def backends(op: str, device: str | torch.device = "cpu") -> list[str]:
    """Backends of `op` that can run here when forced, judged on the op's example inputs."""
    table = _backend.REGISTRY[op]
    x = table.example(torch.device(device))[0]
    return [name for name, impl in table.impls.items() if not impl.reasons(x, forced=True)]


def fast_backends(op: str, device: str | torch.device = "cpu") -> list[str]:
    """backends() without the reference: the paths to compare against it (never with itself)."""
    return [b for b in backends(op, device) if b != "reference"]


def supported_dtypes(op: str, backend: str) -> tuple[torch.dtype, ...]:
    return _backend.REGISTRY[op].impls[backend].dtypes


def errors(actual: torch.Tensor, expected: torch.Tensor, zero_scale: float = 0.0) -> tuple[float, float]:
    """(norm-relative error, worst element error in units of |ref_i| + rms(ref)), NaN/inf excluded.

    An all-zero reference has no size of its own: the error is then relative to zero_scale (the rms of
    the terms the result is a difference of), and must be exactly zero without one.
    """
    a, e = actual.detach().double().cpu().reshape(-1), expected.detach().double().cpu().reshape(-1)
    keep = e.isfinite()
    a, e = a[keep], e[keep]
    if e.numel() == 0:
        return 0.0, 0.0
    diff = a - e
    norm = e.norm().item()
    rms = norm / math.sqrt(e.numel())
    if norm == 0:
        if not diff.any():
            return 0.0, 0.0
        if zero_scale <= 0:
            return math.inf, math.inf
        norm, rms = zero_scale * math.sqrt(e.numel()), zero_scale
    return diff.norm().item() / norm, (diff.abs() / (e.abs() + rms)).max().item()


def _log(name: str, dtype, norm: float, element: float) -> None:
    # KFE_TESTING_LOG=path appends every comparison's errors: how the limits were chosen, and the margins.
    path = os.environ.get("KFE_TESTING_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{dtype}\t{norm:.3e}\t{element:.3e}\t{name}\n")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype, name: str = "output",
                 zero_scale: float = 0.0) -> None:
    """actual (any dtype) against a float64 expected within LIMITS[dtype] (a dtype or 'tf32').

    NaN and inf must sit where the reference has them (a NaN where the reference is finite is usually an
    element the kernel never wrote: outputs start poisoned with NaN). An all-zero reference must be
    matched exactly, or to the limits relative to zero_scale when given (see errors()).
    """
    lim = limit_of(dtype)
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    for what, fa, fe in (("NaN", a.isnan(), e.isnan()), ("inf", a.isinf(), e.isinf())):
        if not torch.equal(fa, fe):
            where = (fa != fe).nonzero()[:5].tolist()
            raise AssertionError(f"{name}: {what} pattern differs from the reference at {where} (first 5); "
                                 "a NaN in the output often means an element the kernel never wrote")
    inf = e.isinf()
    if not torch.equal(a[inf], e[inf]):
        raise AssertionError(f"{name}: infinities of the wrong sign")
    norm, element = errors(a, e, zero_scale)
    _log(name, dtype, norm, element)
    if norm <= lim.norm and element <= lim.element:
        return
    fin = e.isfinite()
    a, e = a[fin], e[fin]
    rms = e.norm().item() / math.sqrt(max(1, e.numel()))
    i = int(((a - e).abs() / (e.abs() + rms)).argmax()) if rms > 0 else int((a - e).abs().argmax())
    raise AssertionError(
        f"{name} ({dtype}): ||out - ref|| / ||ref|| = {norm:.3g} (limit {lim.norm:g}), worst element error "
        f"{element:.3g} x (|ref_i| + rms) (limit {lim.element:g}): {a[i].item():.9g} vs {e[i].item():.9g} "
        f"at flat index {i}; ||ref|| = {torch.linalg.vector_norm(e).item():.3g}, rms {rms:.3g}")


def _float64(arg):
    if isinstance(arg, torch.Tensor) and arg.is_floating_point():
        return arg.detach().double()
    return arg


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _devices(args) -> set[str]:
    return {a.device.type for a in args if isinstance(a, torch.Tensor)}


def assert_ran(ran: dict[str, set[str]], want: str | None, where: str) -> None:
    """Every kfe op recorded in `ran` (engine.backend.record_backends) ran on backend `want`."""
    if want is None:
        return
    if not ran and want != "reference":
        raise AssertionError(f"{where}: no kfe op ran (expected the {want} backend)")
    wrong = {op: sorted(b) for op, b in ran.items() if b != {want}}
    if wrong:
        raise AssertionError(f"{where}: ran on {wrong}, expected {want!r} for every op")


def check_against_reference(fn: Callable, reference: Callable, args: Sequence, *, grad: Sequence[int] = (),
                            backend: str = "auto", dtype=None, kwargs: dict | None = None, seed: int = 0,
                            expect: str | None = None, allow_zero: bool = False) -> None:
    """fn(*args) under `backend` (outputs poisoned) against reference(*args in float64).

    grad: positions of the args to differentiate; both sides get the same upstream gradient (random,
    rounded to the output dtype). dtype: which limits apply (default: the first floating tensor arg's;
    'tf32' for fp32 run with TF32 matmuls). expect: the backend auto must pick (required on CUDA:
    a wrong choice there would test the reference against itself). allow_zero: accept an output or a
    gradient whose reference is all zero (otherwise the case is degenerate: zero passes it).
    """
    kwargs = kwargs or {}
    if dtype is None:
        dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
    if backend == "auto" and expect is None and "cuda" in _devices(args):
        raise ValueError("check_against_reference on CUDA with backend='auto' needs expect=<backend auto must pick>")
    want = expect if backend == "auto" else backend
    fast_args = [a.detach().clone().requires_grad_(True) if i in grad else a for i, a in enumerate(args)]
    ref_args = [_float64(a).requires_grad_(True) if i in grad else _float64(a) for i, a in enumerate(args)]

    with _backend.record_backends() as ran, _backend.use_backend(backend), poison_outputs():
        out = _as_tuple(fn(*fast_args, **kwargs))
    assert_ran(ran, want, f"forward [{backend}]")
    expected = _as_tuple(reference(*ref_args, **kwargs))
    if len(out) != len(expected):
        raise AssertionError(f"{len(out)} outputs, the reference has {len(expected)}")
    zero_scale = _largest_rms(expected) if allow_zero else 0.0
    for k, (o, e) in enumerate(zip(out, expected)):
        _nondegenerate(e, f"output {k}", allow_zero)
        assert_close(o, e, _coarser(dtype, o.dtype) if o.is_floating_point() else dtype,
                     name=f"output {k} [{backend}]", zero_scale=zero_scale)
    if not grad:
        return

    gen = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in out]
    with _backend.record_backends() as ran, _backend.use_backend(backend), poison_outputs():
        got = torch.autograd.grad(out, [fast_args[i] for i in grad], [u.to(o.device) for u, o in zip(upstream, out)],
                                  allow_unused=True)
    assert_ran(ran, want, f"backward [{backend}]")
    want_grads = torch.autograd.grad(expected, [ref_args[i] for i in grad], [u.double() for u in upstream],
                                     allow_unused=True)
    # A gradient that is exactly zero in float64 (one key per query: dq = 0) comes out of a kernel as a
    # rounded difference of equal terms; allow_zero holds it to the size of the call's other gradients.
    zero_scale = _largest_rms([w for w in want_grads if w is not None]) if allow_zero else 0.0
    for i, g, w in zip(grad, got, want_grads):
        if w is None:
            if g is not None and g.any():
                raise AssertionError(f"grad of arg {i} [{backend}] should be zero")
            continue
        if g is None:
            raise AssertionError(f"grad of arg {i} [{backend}] is missing")
        if g.shape != args[i].shape or g.dtype != args[i].dtype:
            raise AssertionError(f"grad of arg {i}: {tuple(g.shape)} {g.dtype}, expected the arg's "
                                 f"{tuple(args[i].shape)} {args[i].dtype}")
        _nondegenerate(w, f"grad of arg {i}", allow_zero)
        # A gradient stored in a coarser dtype than the computation is held to that dtype's limits.
        assert_close(g, w, _coarser(dtype, g.dtype), name=f"grad of arg {i} [{backend}]", zero_scale=zero_scale)


def _largest_rms(tensors) -> float:
    rms = [t.detach()[t.detach().isfinite()].double().square().mean().sqrt().item() for t in tensors if t.numel()]
    return max([r for r in rms if math.isfinite(r)], default=0.0)


def _nondegenerate(ref: torch.Tensor, name: str, allow_zero: bool) -> None:
    if allow_zero or ref.numel() == 0:
        return
    finite = ref.detach()[ref.detach().isfinite()]
    if finite.numel() and not finite.any():
        raise AssertionError(f"{name}: the reference is all zero, so an all-zero result would pass; use a "
                             "non-degenerate case (or allow_zero=True where zero is the point of the test)")


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
