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

    Clamping (as CLIP / open_clip / SLIP): the *parameter* is clamped in place to [0, log(max_scale)]
    under no_grad at the start of every `scale()` (so of every forward), i.e. before each use, which
    is where open_clip's clamp after the previous optimizer step takes effect. The multiplier is then
    exp(logit_scale) in [1, max_scale] (CLIP's "clipped to prevent scaling the logits by more than
    100") and the parameter always gets the true gradient of the loss. Clamping only the value used in
    the forward (exp(logit_scale.clamp(max=...))) instead would zero the gradient once the parameter
    passed the cap, and Adam's momentum would carry it on up for good. The in-place clamp traces
    under torch.compile(fullgraph=True) as an input mutation, with no graph break.
    """

    def __init__(self, kind: str = "clip", init_temperature: float | None = None, max_scale: float = 100.0,
                 init_bias: float = -10.0):
        super().__init__()
        if kind not in ("clip", "siglip"):
            raise ValueError(f"kind must be 'clip' or 'siglip', got {kind!r}")
        if init_temperature is None:
            init_temperature = 0.07 if kind == "clip" else 0.1
        if not max_scale >= 1 or not 1 / max_scale <= init_temperature <= 1:
            # The clamp keeps the multiplier 1 / temperature in [1, max_scale]; an init outside would be
            # silently clamped on the first forward.
            raise ValueError(f"need max_scale >= 1 and 1 / max_scale <= init_temperature <= 1, got "
                             f"init_temperature={init_temperature}, max_scale={max_scale}")
        self.kind, self.max_scale = kind, float(max_scale)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias))) if kind == "siglip" else None

    def scale(self) -> torch.Tensor:
        """The logit multiplier exp(logit_scale), after clamping the parameter in place (see above)."""
        self.clamp_()
        return self.logit_scale.exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        self.logit_scale.clamp_(0, math.log(self.max_scale))

    def forward(self, image: torch.Tensor, text: torch.Tensor, group=None) -> torch.Tensor:
        return contrastive_loss(image, text, self.scale(), self.logit_bias, kind=self.kind, group=group)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, max_scale={self.max_scale:g}"
