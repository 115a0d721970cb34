"""GRN on the gathered rows of a sparse stage, statistics per sample (any per-sample row counts):
reference.py is the spec, triton.py and cpp.py the fast paths, op.py the entry."""
from engine.ops.grn_rows.op import grn_rows

__all__ = ["grn_rows"]
