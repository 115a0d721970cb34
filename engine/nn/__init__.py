"""nn.Module wrappers over the engine's ops, with the parameter names of the official checkpoints."""
from engine.nn.grn import GRN
from engine.nn.sparse_convnextv2 import SparseConvNeXtV2Block, SparseDownsample, SparseDropPath

__all__ = ["GRN", "SparseConvNeXtV2Block", "SparseDownsample", "SparseDropPath"]
