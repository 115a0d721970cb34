"""Workarounds for the Triton CPU interpreter (TRITON_INTERPRET=1), applied only while interpreting.

The interpreter's tl.dot multiplies bf16 operands as their raw 16-bit integers (numpy has no bf16),
so a kernel that feeds bf16 to its dots (as it should on a GPU) gets garbage. `exact_bf16_dot` makes
the interpreter widen bf16 operands to fp32 (exact) before the product; the kernel keeps issuing
bf16 dots, and tests/counting.py still records their bf16 operand dtypes.
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def exact_bf16_dot() -> None:
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    original = builder_cls.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype == tl.bfloat16 and b.dtype == tl.bfloat16:
            def wide(h):  # bf16 bits are the high half of the fp32 with the same value
                return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
            a, b = wide(a), wide(b)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder_cls.create_dot = create_dot
