"""Image-text contrastive loss with a learnable temperature (CLIP, arXiv 2103.00020, Sec. 2.5; SigLIP,
arXiv 2303.15343, Sec. 3), on kfe::contrastive_loss."""
from __future__ import annotations

import math

import torch
from torch import nn

from engine.ops import contrastive_loss


class ContrastiveLoss(nn.Module):
    """CLIP or SigLIP loss of L2-normalised (B, D) image and text embeddings.

    Parameters (open_clip's names, so CLIP / SigLIP checkpoints load): `logit_scale`, the log of the
    logit multiplier, initialised to log(1 / init_temperature) (CLIP: log(1 / 0.07); SigLIP: log 10),
    and, for SigLIP only, `logit_bias` initialised to init_bias (-10).

    Clamping: the multiplier used is exp(min(logit_scale, log(max_scale))), i.e. the *log* scale is
    clamped in the forward pass, so the scale never exceeds max_scale (100, as CLIP's "clipped to
    prevent scaling the logits by more than 100"); while clamped the parameter gets no gradient.
    `clamp_()` clamps the parameter in place instead, as open_clip's training loop does after each
    optimizer step (call it there if you prefer that behaviour; the two give the same forward).
    """

    def __init__(self, kind: str = "clip", init_temperature: float | None = None, max_scale: float = 100.0,
                 init_bias: float = -10.0):
        super().__init__()
        if kind not in ("clip", "siglip"):
            raise ValueError(f"kind must be 'clip' or 'siglip', got {kind!r}")
        if init_temperature is None:
            init_temperature = 0.07 if kind == "clip" else 0.1
        if not init_temperature > 0 or not max_scale > 0:
            raise ValueError(f"init_temperature and max_scale must be positive, got {init_temperature}, {max_scale}")
        self.kind, self.max_scale = kind, float(max_scale)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias))) if kind == "siglip" else None

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(self.max_scale)).exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        self.logit_scale.clamp_(0, math.log(self.max_scale))

    def forward(self, image: torch.Tensor, text: torch.Tensor, group=None) -> torch.Tensor:
        return contrastive_loss(image, text, self.scale(), self.logit_bias, kind=self.kind, group=group)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, max_scale={self.max_scale:g}"
