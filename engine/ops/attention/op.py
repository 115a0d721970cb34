"""kfe::attention: the public entry, input checks, custom ops (fake + autograd), FLOP formulas, dispatch.

kfe::attention returns (out, lse); the log-sum-exp is saved for the backward (kfe::attention_backward
recomputes P from it instead of replaying the forward) and is not differentiable.
"""
from __future__ import annotations

import math
import numbers

import torch

from engine.backend import Impl, OpBackends, register
from engine.ops import _checks
from engine.ops.attention import reference, sdpa

LOWP = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256  # the Triton kernels hold a (BLOCK, next_pow2(D)) tile in registers


def _example(device: torch.device) -> tuple:
    q = torch.randn(1, 2, 7, 32, device=device)
    return q, q.clone(), q.clone(), False, 32 ** -0.5


BACKENDS = register(OpBackends("attention", example=_example))
BACKENDS.add(Impl("triton", "engine.ops.attention.triton", dtypes=LOWP,
                  why="fused Triton kernels (FlashAttention-2 style) on CUDA tensors"))
BACKENDS.add(Impl("torch", "engine.ops.attention.sdpa", devices=("cpu",), available=sdpa.missing,
                  why="torch's fused CPU flash attention (SDPA's CPU kernel): the same function and LSE, "
                      "forward ~4-8x, backward ~1.5x the reference on CPU"))
BACKENDS.add(Impl("reference", "engine.ops.attention.reference", why="plain PyTorch, the specification"))


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("kfe::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = BACKENDS.select(q, k, v, causal, scale).forward(q, k, v, causal, scale)
    return out, lse


@_attention.register_fake
def _attention_fake(q, k, v, causal, scale):
    B, H, N, D = q.shape
    return q.new_empty((B, H, N, D)), q.new_empty((B, H, N), dtype=_lse_dtype(q))


@torch.library.custom_op("kfe::attention_backward", mutates_args=())
def _attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor, causal: bool, scale: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = BACKENDS.select(q, k, v, causal, scale).backward(dout, q, k, v, out, lse, causal, scale)
    return dq, dk, dv


@_attention_backward.register_fake
def _attention_backward_fake(dout, q, k, v, out, lse, causal, scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.mark_non_differentiable(lse)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_backward(dout, q, k, v, out, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


_attention.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------- FLOPs
def useful_pairs(N: int, M: int, causal: bool) -> int:
    """(query, key) pairs that enter the softmax: N*M, or with the top-left causal mask sum_i min(i+1, M)."""
    if not causal:
        return N * M
    t = min(N, M)
    return t * (t + 1) // 2 + (N - t) * M


def flop_count(q_shape, k_shape, causal: bool, backward: bool = False) -> int:
    """Useful FLOPs: 4*B*H*pairs*D forward (q@k^T and P@v), 2.5x that backward (five matmuls)."""
    B, H, N, D = q_shape
    fwd = 4 * B * H * useful_pairs(N, k_shape[-2], causal) * D
    return fwd * 5 // 2 if backward else fwd


def _register_flop_formulas() -> None:
    # So torch.utils.flop_counter.FlopCounterMode (the models' MFU) counts attention. Note that the
    # flop_counter module imports triton; triton reads TRITON_INTERPRET only when a kernel is
    # decorated (engine.ops.attention.triton, imported lazily), so setting it later still works.
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.kfe.attention)
    def _fwd_flops(q, k, v, causal=False, *args, out_shape=None, **kwargs) -> int:
        return flop_count(q, k, causal)

    @register_flop_formula(torch.ops.kfe.attention_backward)
    def _bwd_flops(dout, q, k, v, out, lse, causal=False, *args, out_shape=None, **kwargs) -> int:
        return flop_count(q, k, causal, backward=True)


_register_flop_formulas()


# ---------------------------------------------------------------------------------------------- entry
def _check(q, k, v, causal, scale) -> None:
    _checks.tensor("q", q, ndim=4, layout="(B, H, N, D)")
    _checks.tensor("k", k, ndim=4, layout="(B, H, M, D)")
    _checks.tensor("v", v, ndim=4, layout="(B, H, M, D)")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k and v must share one dtype")
        _checks.same_device(name, t, "q", q)
    B, H, N, D = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (B, H, D):
        raise ValueError(f"k must be (B, H, M, D) = ({B}, {H}, M, {D}) to match q of shape {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)} (B, H, M, D), got {tuple(v.shape)}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D (q.shape[-1]) must be between 1 and {MAX_HEAD_DIM}, got {D}")
    if k.shape[2] == 0:
        raise ValueError(f"k and v need at least one key (M >= 1), got k of shape {tuple(k.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is not None:
        # numbers.Real covers Python and NumPy scalars (np.float32 is not a float subclass, np.float64 is).
        if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
            raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale!r}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention, softmax(scale * q @ k^T [causal mask]) @ v, on kfe::attention.

    Args:
        q: (B, H, N, D) queries; k, v: (B, H, M, D) keys and values (torch SDPA's layout; any strides,
            e.g. views of one packed qkv projection). float32 / float16 / bfloat16 (float64 runs the
            reference). Head dim D up to 256; the kernels are tuned for 32, 64, 72, 80, 96 and 128.
        causal: query i attends keys j <= i, top-left aligned like torch SDPA's `is_causal` (for
            N > M the last queries see every key; flash-attn aligns bottom-right instead).
        scale: multiplies q @ k^T; default D ** -0.5.

    Returns out (B, H, N, D) in q's dtype, contiguous. Softmax and sums run in float32.
    Differentiable in q, k and v.
    """
    _check(q, k, v, causal, scale)
    scale = reference.default_scale(q.shape[-1]) if scale is None else float(scale)
    return _attention(q, k, v, causal, scale)[0]
