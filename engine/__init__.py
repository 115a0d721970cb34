"""KFE engine: hand-written kernels (Triton, C++, CUDA) behind torch.library ops.

    import engine
    y = engine.ops.grn(x, gamma, beta, mask)       # kfe::grn, auto backend
    with engine.use_backend("triton"): ...         # force a backend (or KFE_BACKEND=triton)

`kfe doctor` shows which backends each op has on this machine and which one `auto` picks.
"""
from engine import nn, ops
from engine.backend import BackendUnavailable, requested as requested_backend, use_backend

__all__ = ["BackendUnavailable", "nn", "ops", "requested_backend", "use_backend"]
