"""nn.Module wrappers over the engine's ops, with the parameter names of the official checkpoints."""
from engine.nn.attention import Attention
from engine.nn.contrastive import ContrastiveLoss
from engine.nn.grn import GRN

__all__ = ["Attention", "ContrastiveLoss", "GRN"]
