"""Loads the compiled extension engine._C (built by setup.py from csrc/), if it is there.

Importing it registers the compiled kernels as torch.ops.kfe.*. Without it every op still works on
Triton and the references; `kfe doctor` reports why it is missing. KFE_DISABLE_EXT=1 ignores a built
extension (to test the fallback, or to rule the C++ kernels out while debugging).
"""
from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=None)
def _load() -> tuple[object | None, str]:
    if os.environ.get("KFE_DISABLE_EXT") == "1":
        return None, "disabled by KFE_DISABLE_EXT=1"
    try:
        import torch  # noqa: F401  (the extension links against torch's libraries)

        from engine import _C
    except ImportError as err:
        return None, f"{err}; build it with `pip install --no-build-isolation -e .`"
    return _C, ""


def loaded() -> bool:
    return _load()[0] is not None


def load_error() -> str:
    return _load()[1]


def path() -> str | None:
    module = _load()[0]
    return getattr(module, "__file__", None)


def has_op(name: str) -> bool:
    """Whether the extension registered torch.ops.kfe.<name>."""
    if not loaded():
        return False
    import torch

    return hasattr(torch.ops.kfe, name)


def require() -> None:
    """Load the extension or raise ImportError saying why (for modules that wrap its kernels)."""
    if not loaded():
        raise ImportError(f"engine._C is not available: {load_error()}")
