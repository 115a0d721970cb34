"""SimCLR's augmentation (Chen et al., arXiv 2002.05709, Appendix A) as SLIP applies it, and SLIP's
three views per image.

SLIP (arXiv 2112.12750, Sec. 3; the official datasets.py) feeds the CLIP branch one RandomResizedCrop
(scale 0.5-1) and the SimCLR branch two independent views: RandomResizedCrop (scale 0.08-1) ->
colour jitter (brightness, contrast, saturation 0.4, hue 0.1, in random order) with p 0.8 ->
grayscale with p 0.2 -> Gaussian blur (sigma 0.1-2 at 224 px) with p 0.5 -> horizontal flip with p 0.5.
Here every random draw comes from the sample's own numpy Generator (seeded by the loader from
(seed, epoch, index)), so a resumed run sees the same pixels. The blur's sigma range is scaled with
the resolution (resolution / 224), so a 32 px image is not blurred flat.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from train.data.transforms import make_transform

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape(3, 1, 1)  # torchvision's grayscale


def _gray(x: np.ndarray) -> np.ndarray:
    return (x * _LUMA).sum(0, keepdims=True)  # (1, H, W)


def _hue_shift(x: np.ndarray, h: float) -> np.ndarray:
    """Rotate the hue of (3, H, W) RGB in [0, 1] by h turns (via HSV, as torchvision's adjust_hue)."""
    r, g, b = x
    mx, mn = x.max(0), x.min(0)
    d = mx - mn
    safe = np.where(d > 0, d, 1.0)
    hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    hue = np.where(d > 0, hue, 0.0)
    hue = (hue + h) % 1.0
    sat = np.where(mx > 0, d / np.where(mx > 0, mx, 1.0), 0.0)
    v = mx
    i = np.floor(hue * 6)
    f = hue * 6 - i
    p, q, t = v * (1 - sat), v * (1 - sat * f), v * (1 - sat * (1 - f))
    i = i.astype(np.int64) % 6
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.empty_like(x)
    for c in range(3):
        out[c] = np.select([i == k for k in range(6)], [ch[c] for ch in choices])
    return out


def color_jitter(x: np.ndarray, rng: np.random.Generator, brightness=0.4, contrast=0.4, saturation=0.4,
                 hue=0.1) -> np.ndarray:
    """torchvision ColorJitter on (3, H, W) float in [0, 1]: the four adjustments in a random order."""
    for op in rng.permutation(4):
        if op == 0:
            x = np.clip(x * rng.uniform(1 - brightness, 1 + brightness), 0, 1)
        elif op == 1:
            m = float(_gray(x).mean())
            x = np.clip((x - m) * rng.uniform(1 - contrast, 1 + contrast) + m, 0, 1)
        elif op == 2:
            g = _gray(x)
            x = np.clip((x - g) * rng.uniform(1 - saturation, 1 + saturation) + g, 0, 1)
        else:
            x = _hue_shift(x, rng.uniform(-hue, hue))
    return x.astype(np.float32)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (3, H, W), reflect padding, radius ceil(3 sigma)."""
    r = max(1, math.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        xp = np.pad(x, pad, mode="reflect" if x.shape[axis] > r else "edge")
        n = x.shape[axis]
        x = sum(w * np.take(xp, np.arange(j, j + n), axis=axis) for j, w in enumerate(k))
    return x


def simclr_transform(resolution: int, crop_min_scale: float = 0.08, blur_sigma=(0.1, 2.0)) -> Callable:
    """(image, rng) -> (3, res, res) uint8: one SimCLR view."""
    crop = make_transform(resolution, "rrc", crop_min_scale)  # RandomResizedCrop + flip
    scale = resolution / 224

    def transform(img, rng: np.random.Generator) -> torch.Tensor:
        x = crop(img, rng).numpy().astype(np.float32) / 255  # (3, H, W)
        if rng.random() < 0.8:
            x = color_jitter(x, rng)
        if rng.random() < 0.2:
            x = np.repeat(_gray(x), 3, axis=0)
        if rng.random() < 0.5:
            x = gaussian_blur(x, rng.uniform(*blur_sigma) * scale)
        return torch.from_numpy(np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8))

    return transform


class SlipViews:
    """(image, rng) -> (3, 3 views, H, W) uint8: the CLIP view, then two SimCLR views. Views go second,
    as frames do in a clip (3, T, H, W), so batches normalise per colour channel like video."""

    def __init__(self, clip_view: Callable, resolution: int, crop_min_scale: float = 0.08):
        self.clip_view, self.ssl_view = clip_view, simclr_transform(resolution, crop_min_scale)

    def __call__(self, img, rng: np.random.Generator) -> torch.Tensor:
        return torch.stack([self.clip_view(img, rng), self.ssl_view(img, rng), self.ssl_view(img, rng)], dim=1)
