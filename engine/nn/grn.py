"""GRN layer of ConvNeXt V2 (arXiv 2301.00808), on kfe::grn."""
from __future__ import annotations

import torch
from torch import nn

from engine.ops import grn


class GRN(nn.Module):
    """Global Response Normalization for channels-last input (N, H, W, C).

    Parameters `gamma` and `beta` are shaped (1, 1, 1, dim) and start at zero, as in the official
    ConvNeXt-V2 code, so its checkpoints load unchanged (and the layer starts as the identity).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return grn(x, self.gamma, self.beta, mask, self.eps)

    def extra_repr(self) -> str:
        return f"dim={self.gamma.shape[-1]}, eps={self.eps}"
