"""The engine's ops. Each family is a package: reference.py (the spec), fast paths, op.py (entry)."""
from engine.ops.attention import attention
from engine.ops.contrastive import contrastive_loss
from engine.ops.grn import grn
from engine.ops.grn_rows import grn_rows
from engine.ops.hog import hog, hog_targets
from engine.ops.sparse_conv import sparse_dwconv2d, sparse_dwconv2d_rows

__all__ = ["attention", "contrastive_loss", "grn", "grn_rows", "hog", "hog_targets", "sparse_dwconv2d", "sparse_dwconv2d_rows"]
