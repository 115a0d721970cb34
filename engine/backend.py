"""Which implementation runs each KFE op.

Backends, in the order `auto` tries them:

  cuda       CUDA C++ kernels from csrc/cuda (compiled into engine._C, or JIT-compiled at run time)
  triton     Triton kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 when forced
  cpp        C++ CPU kernels from csrc/cpu, compiled into engine._C
  torch      a fused kernel that torch itself ships (e.g. its flash attention for CPU), where it computes
             exactly the op's function and beats the reference; no build needed
  reference  plain PyTorch: the specification, runs anywhere

Choose with the environment variable KFE_BACKEND (auto | cuda | triton | cpp | torch | reference) or, for a
block of code, `with engine.use_backend("triton"): ...`. The choice is process-wide rather than
thread-local on purpose: autograd runs CUDA backward passes on its own threads, which must see it.
A forced backend that cannot run the inputs raises BackendUnavailable with its reasons; `auto`
takes the first backend that can, and logs once when it passes over an installed fast path.

Each op declares its backends with an `OpBackends` table (see engine/ops/grn/op.py). The kernel
modules (Triton kernels, extension wrappers) are imported on first use. Importing the engine does
import triton's package (torch.utils.flop_counter does, for the FLOP formulas), but no kernel is
defined then, so TRITON_INTERPRET set after `import engine` still takes effect.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

log = logging.getLogger("kfe")

BACKENDS = ("cuda", "triton", "cpp", "torch", "reference")
CHOICES = ("auto",) + BACKENDS
# Why `auto` takes a backend when it can, unless its Impl says more (`kfe doctor` prints it). The
# order is fastest-first as measured by `kfe bench` on each device the backend runs on.
WHY = {
    "cuda": "hand-written CUDA kernels, the fastest path where built",
    "triton": "fused Triton kernels on CUDA tensors",
    "cpp": "C++ CPU kernels from engine._C, faster than the reference on the CPU",
    "torch": "a fused kernel of torch's own, faster than the reference",
    "reference": "no faster backend can run these inputs",
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_forced: list[str] = []
_recorders: list[dict[str, set[str]]] = []  # open record_backends() blocks


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run the given inputs (the message lists why)."""


def _validate(name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in CHOICES:
        raise ValueError(f"{source} must be one of {', '.join(CHOICES)}; got {name!r}")
    return name


def requested() -> str:
    """The backend asked for right now: innermost use_backend(), else $KFE_BACKEND, else 'auto'."""
    if _forced:
        return _forced[-1]
    return _validate(os.environ.get("KFE_BACKEND", "auto") or "auto", "KFE_BACKEND")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops called inside the block (forward and backward) on backend `name`."""
    _forced.append(_validate(name, "use_backend(name)"))
    try:
        yield
    finally:
        _forced.pop()


@contextlib.contextmanager
def record_backends() -> Iterator[dict[str, set[str]]]:
    """Yields {op: backends that ran it} for the ops called inside the block (tests assert on it)."""
    seen: dict[str, set[str]] = {}
    _recorders.append(seen)
    try:
        yield seen
    finally:
        _recorders.remove(seen)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_version() -> str | None:
    try:
        import triton
    except Exception:  # noqa: BLE001 - a broken install is "not available", not a crash
        return None
    return triton.__version__


def _installed(backend: str) -> list[str]:
    """Reasons the machinery behind a backend is missing (not about any op or input)."""
    from engine import _ext

    if backend == "triton" and triton_version() is None:
        return ["triton is not installed"]
    if backend == "cpp" and not _ext.loaded():
        return [f"engine._C is not built ({_ext.load_error()})"]
    if backend == "cuda" and not torch.cuda.is_available():
        return ["no CUDA device"]
    return []


def _device_reasons(backend: str, device: torch.device, forced: bool) -> list[str]:
    if backend in ("reference", "torch"):  # torch's kernels say per op which devices they take (Impl.check)
        return []
    if backend == "cpp":
        return [] if device.type == "cpu" else [f"C++ kernels run on CPU tensors, got {device.type}"]
    if device.type == "cuda":
        return []
    if backend == "triton" and device.type == "cpu" and triton_interpreting():
        return [] if forced else ["CPU tensors take Triton only when forced (KFE_BACKEND=triton)"]
    hint = " (set TRITON_INTERPRET=1 to interpret on the CPU)" if backend == "triton" else ""
    return [f"{backend} kernels need CUDA tensors, got {device.type}{hint}"]


@dataclass
class Impl:
    """One backend of one op: where its code lives and what inputs it accepts."""

    backend: str
    module: str  # imported on first use; exposes the op's forward/backward functions
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    check: Callable[..., list[str]] | None = None  # op-specific reasons for given inputs
    available: Callable[[], list[str]] | None = None  # op-specific install reasons (e.g. a kernel missing)
    why: str = ""  # why `auto` takes it when it can (for `kfe doctor`), e.g. a measured speed-up
    devices: tuple[str, ...] | None = None  # device types it takes, where narrower than its backend's

    def reasons(self, x: torch.Tensor, *args, forced: bool = False, device: torch.device | None = None) -> list[str]:
        """Why this backend cannot run these inputs ([] = it can). `device` judges x as if it lived
        there (what `auto` would do on a GPU, asked on a machine without one)."""
        device = x.device if device is None else torch.device(device)
        why = _installed(self.backend) + (self.available() if self.available else [])
        if why:
            return why
        why = _device_reasons(self.backend, device, forced)
        if self.devices is not None and device.type not in self.devices:
            why.append(f"runs on {' / '.join(self.devices)} tensors, got {device.type}")
        if x.dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            why.append(f"dtype {str(x.dtype).removeprefix('torch.')} not supported (supports {names})")
        if self.check is not None:
            why += self.check(x, *args)
        return why

    def load(self):
        return importlib.import_module(self.module)


@dataclass
class OpBackends:
    """The backends of one op, consulted on every call."""

    op: str
    example: Callable[[torch.device], tuple]  # representative inputs, for `kfe doctor`
    impls: dict[str, Impl] = field(default_factory=dict)
    _warned: set = field(default_factory=set)

    def add(self, impl: Impl) -> None:
        assert impl.backend in BACKENDS, impl.backend
        self.impls[impl.backend] = impl

    def select(self, x: torch.Tensor, *args):
        """The module of the backend that runs these inputs (x decides device and dtype)."""
        want = requested()
        if want != "auto":
            impl = self.impls.get(want)
            if impl is None:
                raise BackendUnavailable(
                    f"kfe::{self.op} has no {want} backend (it has: {', '.join(self.impls)})")
            why = impl.reasons(x, *args, forced=True)
            if why:
                raise BackendUnavailable(f"backend {want!r} cannot run kfe::{self.op}: " + "; ".join(why))
            return self._ran(impl)
        impl, skipped = self.pick(x, *args)
        if impl is None:
            raise BackendUnavailable(f"no backend can run kfe::{self.op}: " + " | ".join(
                f"{name}: {'; '.join(why)}" for name, why in skipped.items()))
        self._note_fallback(x, impl, skipped)
        return self._ran(impl)

    def _ran(self, impl: Impl):
        for seen in _recorders:
            seen.setdefault(self.op, set()).add(impl.backend)
        return impl.load()

    def pick(self, x: torch.Tensor, *args, device: torch.device | None = None
             ) -> tuple[Impl | None, dict[str, list[str]]]:
        """What `auto` would choose, and why each backend before it was passed over (`device`: judge
        the inputs as if they lived there)."""
        skipped: dict[str, list[str]] = {}
        for name in BACKENDS:
            impl = self.impls.get(name)
            if impl is None:
                continue
            why = impl.reasons(x, *args, device=device)
            if not why:
                return impl, skipped
            skipped[name] = why
        return None, skipped

    def _note_fallback(self, x: torch.Tensor, impl: Impl, skipped: dict[str, list[str]]) -> None:
        # Passing over a fast path on a GPU is worth one log line; on the CPU it is the normal case.
        if x.device.type != "cuda" or impl.backend in ("cuda", "triton"):
            return
        key = (impl.backend, x.dtype, tuple(sorted(skipped)))
        if key not in self._warned:
            self._warned.add(key)
            log.warning("kfe::%s runs on %s for %s %s inputs: %s", self.op, impl.backend, x.device.type,
                        x.dtype, "; ".join(f"{n}: {', '.join(w)}" for n, w in skipped.items()))


REGISTRY: dict[str, OpBackends] = {}


def register(table: OpBackends) -> OpBackends:
    REGISTRY[table.op] = table
    return table


def backends_of(op: str) -> Sequence[str]:
    return tuple(REGISTRY[op].impls)
