"""HOG (MaskFeat targets): reference.py is the spec; triton.py, cpp.py and cuda.py the fast paths; op.py the entry."""
from engine.ops.hog.op import hog, hog_targets

__all__ = ["hog", "hog_targets"]
