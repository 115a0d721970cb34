"""Attention (FlashAttention-2): reference.py is the spec, triton.py the fast path, op.py the entry."""
from engine.ops.attention.op import attention

__all__ = ["attention"]
