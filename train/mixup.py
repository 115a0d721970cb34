"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on a batch, with label-smoothed soft targets.

As timm's Mixup in batch mode (the ConvNeXt recipe): with probability `prob` a batch is mixed with
its own reverse; CutMix or Mixup is chosen with `switch_prob` when both are on; lam ~ Beta(a, a);
CutMix pastes one box of area (1 - lam) and corrects lam to the box actually pasted. The randomness
comes from torch's global CPU generator, which checkpoints save and restore (exact resume).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def smooth_one_hot(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((y.shape[0], num_classes), off, device=y.device).scatter_(1, y[:, None], 1 - smoothing + off)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class MixupCutmix:
    def __init__(self, num_classes: int, mixup: float = 0.8, cutmix: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, smoothing: float = 0.1):
        if mixup < 0 or cutmix < 0 or not 0 <= prob <= 1 or not 0 <= switch_prob <= 1:
            raise ValueError(f"mixup/cutmix alphas must be >= 0 and probabilities in [0, 1], got mixup={mixup}, "
                             f"cutmix={cutmix}, prob={prob}, switch_prob={switch_prob}")
        self.num_classes, self.mixup, self.cutmix = num_classes, mixup, cutmix
        self.prob, self.switch_prob, self.smoothing = prob, switch_prob, smoothing

    @property
    def active(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.prob > 0

    def _draw(self) -> tuple[float, bool]:
        if torch.rand(()).item() >= self.prob:
            return 1.0, False
        use_cutmix = self.cutmix > 0 and (self.mixup == 0 or torch.rand(()).item() < self.switch_prob)
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = torch.distributions.Beta(alpha, alpha).sample().item()
        return lam, use_cutmix

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C, H, W), y (N,) -> mixed x, soft targets (N, classes)."""
        lam, use_cutmix = self._draw()
        if lam < 1.0:
            flipped = x.flip(0)
            if use_cutmix:
                H, W = x.shape[-2:]
                cut = math.sqrt(1 - lam)
                ch, cw = int(H * cut), int(W * cut)
                cy, cx = int(torch.randint(H, ()).item()), int(torch.randint(W, ()).item())
                y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
                x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
                x = x.clone()
                x[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
                lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
            else:
                x = x * lam + flipped * (1 - lam)
        t = smooth_one_hot(y, self.num_classes, self.smoothing)
        return x, t * lam + t.flip(0) * (1 - lam)
