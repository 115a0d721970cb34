"""The engine's ops. Each family is a package: reference.py (the spec), fast paths, op.py (entry)."""
from engine.ops.contrastive import contrastive_loss
from engine.ops.grn import grn

__all__ = ["contrastive_loss", "grn"]
