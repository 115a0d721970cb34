"""GRN (ConvNeXt V2): reference.py is the spec, triton.py and cpp.py the fast paths, op.py the entry."""
from engine.ops.grn.op import grn

__all__ = ["grn"]
