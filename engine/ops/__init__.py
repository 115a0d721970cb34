"""The engine's ops. Each family is a package: reference.py (the spec), fast paths, op.py (entry)."""
from engine.ops.grn import grn
from engine.ops.hog import hog, hog_targets

__all__ = ["grn", "hog", "hog_targets"]
