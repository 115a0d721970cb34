"""Submanifold depthwise convolution (FCMAE / ConvNeXt V2): reference.py is the spec, triton.py and
cpp.py the fast paths, op.py the entries (dense layout and the gathered rows of engine.sparse)."""
from engine.ops.sparse_conv.op import sparse_dwconv2d, sparse_dwconv2d_rows

__all__ = ["sparse_dwconv2d", "sparse_dwconv2d_rows"]
