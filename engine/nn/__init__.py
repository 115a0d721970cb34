"""nn.Module wrappers over the engine's ops, with the parameter names of the official checkpoints."""
from engine.nn.attention import Attention
from engine.nn.contrastive import ContrastiveLoss
from engine.nn.grn import GRN
from engine.nn.sparse_convnextv2 import SparseConvNeXtV2Block, SparseDownsample, SparseDropPath

__all__ = ["Attention", "ContrastiveLoss", "GRN", "SparseConvNeXtV2Block", "SparseDownsample", "SparseDropPath"]
