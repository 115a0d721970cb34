"""The `torch` backend of kfe::attention: torch's own fused flash attention for CPU tensors.

aten::_scaled_dot_product_flash_attention_for_cpu (what F.scaled_dot_product_attention runs on the CPU)
computes kfe::attention's function and returns the same log-sum-exp: natural log, (B, H, N), float32
(float64 for float64 inputs), causal mask top-left aligned for any N and M, every head dim, strided
inputs. Its backward takes that LSE, so forward and backward pair up like the other backends'
(tests/engine/ops/test_attention.py runs it against the float64 reference like every backend).
Two inputs it gets wrong (measured, torch 2.14) are mapped onto ones it gets right:
  - scale <= 0 returns NaN (it scales q and k by sqrt(scale)): scale * (q k^T) = |scale| * ((-q) k^T),
    and scale 0 is 1 * (0 k^T); dq then picks up the factor -1 or 0;
  - zero queries (N = 0, H = 0 or B = 0) die with SIGFPE: nothing to compute, empty outputs / zero grads.
On a 2-core CPU (ViT-B/16 and ViT-H/14 shapes, fp32, interleaved timings) its forward is ~4-8x the
reference's and its backward ~1.5x (`kfe bench attention --device cpu`), so `auto` takes it there.
"""
from __future__ import annotations

import torch


def missing() -> list[str]:
    """Reasons this torch lacks the kernel (older releases have no CPU flash attention)."""
    ok = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")
    return [] if ok else [f"torch {torch.__version__} has no aten._scaled_dot_product_flash_attention_for_cpu"]


def _positive(q: torch.Tensor, scale: float) -> tuple[torch.Tensor, float, float]:
    """(q', scale', dq/dq') with scale' > 0 and scale' * q' = scale * q."""
    if scale > 0:
        return q, scale, 1.0
    if scale < 0:
        return -q, -scale, -1.0
    return torch.zeros_like(q), 1.0, 0.0


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def forward(q, k, v, causal: bool, scale: float):
    if q.numel() == 0:
        B, H, N, D = q.shape
        return q.new_empty((B, H, N, D)), q.new_empty((B, H, N), dtype=_lse_dtype(q))
    q, scale, _ = _positive(q, scale)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=None, scale=scale)
    # kfe::attention's fake promises contiguous (B, H, N, D); the kernel may return other strides.
    return out.contiguous(), lse.contiguous()


def backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    if q.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    q, scale, dq_sign = _positive(q, scale)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, attn_mask=None, scale=scale)
    if dq_sign != 1.0:
        dq = dq * dq_sign
    return dq.contiguous(), dk.contiguous(), dv.contiguous()
