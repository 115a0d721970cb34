"""Count what Triton kernels execute under the interpreter (TRITON_INTERPRET=1): dots, bytes, launches.

`with count_triton() as c: <launch kernels>` wraps the interpreter's builder (the object every
`tl.*` call lowers to) for the duration of the block and records
- every `tl.dot`: matrix FLOPs 2*M*N*K (batch dims multiplied in), its operand dtypes and its input
  precision (the interpreter computes bf16 dots through fp32, so numerics alone cannot show which
  dtype a kernel fed its dots: the recorded dtypes can);
- every load and store: bytes over the full tile (lanes x element size), and apart from that the bytes
  of the masked-out lanes, so tile padding shows instead of hiding in the total;
- launches (one `set_grid_dim` per launch).
The counts are of executed work, i.e. what a GPU would run for the same grid and block sizes.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter

import numpy as np


@dataclasses.dataclass
class Counts:
    dot_flops: int = 0
    dots: Counter = dataclasses.field(default_factory=Counter)  # (a dtype, b dtype, precision) -> flops
    load_bytes: int = 0
    load_masked_bytes: int = 0   # part of load_bytes whose lanes were masked off
    store_bytes: int = 0
    store_masked_bytes: int = 0
    launches: int = 0

    def dot_dtypes(self) -> set:
        return {(a, b) for a, b, _ in self.dots}

    def precisions(self) -> set:
        return {p for _, _, p in self.dots}


def _elsize(ptrs) -> int:
    return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)


@contextlib.contextmanager
def count_triton():
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    counts = Counts()
    cls = type(builder)  # looked up per call: engine.ops._interpret may patch the class meanwhile

    def counted_dot(a, b, d, input_precision, max_num_imprecise_acc):
        *batch, m, k = a.data.shape
        n = b.data.shape[-1]
        flops = 2 * int(np.prod(batch, dtype=np.int64)) * m * n * k
        counts.dot_flops += flops
        precision = getattr(input_precision, "name", str(input_precision))
        counts.dots[(str(a.dtype), str(b.dtype), precision)] += flops
        return cls.create_dot(builder, a, b, d, input_precision, max_num_imprecise_acc)

    def counted_load(ptrs, mask, other, *args):
        size = _elsize(ptrs)
        counts.load_bytes += ptrs.data.size * size
        counts.load_masked_bytes += int((~np.broadcast_to(mask.data, ptrs.data.shape)).sum()) * size
        return cls.create_masked_load(builder, ptrs, mask, other, *args)

    def counted_store(ptrs, value, mask, *args):
        size = _elsize(ptrs)
        counts.store_bytes += ptrs.data.size * size
        counts.store_masked_bytes += int((~np.broadcast_to(mask.data, ptrs.data.shape)).sum()) * size
        return cls.create_masked_store(builder, ptrs, value, mask, *args)

    def counted_grid(*args, **kwargs):
        counts.launches += 1
        return cls.set_grid_dim(builder, *args, **kwargs)

    builder.create_dot, builder.create_masked_load = counted_dot, counted_load
    builder.create_masked_store, builder.set_grid_dim = counted_store, counted_grid
    try:
        yield counts
    finally:  # instance attributes shadow the class methods; deleting them restores the originals
        for name in ("create_dot", "create_masked_load", "create_masked_store", "set_grid_dim"):
            builder.__dict__.pop(name, None)
