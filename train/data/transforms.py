"""Image decoding and the per-sample transforms; normalisation happens on the device, per batch.

Workers hand out uint8 (3, H, W) tensors (4x less to move than float32); `normalize` turns a batch
into float, ImageNet-normalised, optionally channels-last, on the training device. Random transforms
take an explicit numpy Generator, seeded by the loader from (seed, epoch, index): augmentation is a
pure function of the sample's position in the data stream, whatever worker draws it, so a resumed
run sees exactly the same pixels.
"""
from __future__ import annotations

import io
import math
import random
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTS = ("none", "flip", "rrc")


class DataError(ValueError):
    """A data spec that cannot be used (missing path, empty folder, no good sample at all, ...)."""


class BadSample(Exception):
    """A sample the loader skips and counts; `reason` is the metrics key (e.g. corrupt_image)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_image(data: bytes | str, what: str = "") -> Image.Image:
    """Bytes (or a file path) -> RGB PIL image; undecodable data raises BadSample('corrupt_image')."""
    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
        img.load()  # PIL is lazy: force the decode here so truncated files fail now
        return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadSample("corrupt_image", f"{what}: {err}") from None


def _random_resized_crop(w: int, h: int, rng: np.random.Generator, scale: tuple[float, float],
                         ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, width, height) as torchvision's RandomResizedCrop draws it (10 tries, then centre)."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        cw, ch = int(round(h * ratio[1])), h
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def _center(img: Image.Image, res: int, crop_pct: float) -> Image.Image:
    """Resize the shorter side to res / crop_pct, then crop the centre res x res (the eval transform).
    Sizes truncate as ConvNeXt's `int(input_size / crop_pct)` and torchvision's Resize(int) do."""
    w, h = img.size
    short = int(res / crop_pct)
    if (w, h) != (res, res):
        # torchvision's Resize(short) sizes: the long side truncated, int(short * long / shorter)
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        img = img.resize((max(res, size[0]), max(res, size[1])), Image.BICUBIC)
        w, h = img.size
    # torchvision's CenterCrop offsets (round half to even), so the eval crop equals CLIP's / timm's pixel for pixel
    left, top = int(round((w - res) / 2.0)), int(round((h - res) / 2.0))
    return img.crop((left, top, left + res, top + res))


def to_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """PIL / (H, W, 3) uint8 array -> (3, H, W) uint8 tensor."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (3, H, W)


def _posterize(img: Image.Image, bits: int, **_) -> Image.Image:
    """timm's posterize, also for bits = 0 (keep no bit: black), which "inc1" reaches at magnitude 10 and
    Pillow >= 11's ImageOps.posterize rejects; older Pillow's lookup table gave black there too."""
    if bits >= 8:
        return img
    if bits <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits)


def rand_augment(spec: str, resolution: int) -> Callable[[Image.Image, np.random.Generator], Image.Image]:
    """timm's RandAugment (e.g. "rand-m9-mstd0.5-inc1": 2 ops, magnitude 9, magnitude std 0.5, as ConvNeXt,
    MAE and ConvNeXt V2 fine-tune), with timm's ImageNet hparams. timm draws from Python's and numpy's global
    generators: both are seeded from the sample's rng and restored after, so the result stays a function of
    the sample (whatever worker draws it: exact resume)."""
    from timm.data import rand_augment_transform

    hparams = {"translate_const": int(resolution * 0.45), "img_mean": tuple(round(255 * m) for m in IMAGENET_MEAN)}
    try:
        op = rand_augment_transform(spec, hparams)
    except (AssertionError, KeyError, ValueError) as err:
        raise ValueError(f"randaug {spec!r} is not a timm RandAugment spec like 'rand-m9-mstd0.5-inc1': {err}") from None
    for o in op.ops:  # (see _posterize)
        if o.aug_fn.__name__ == "posterize":
            o.aug_fn = _posterize

    def apply(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        saved, saved_np = random.getstate(), np.random.get_state()
        random.seed(int(rng.integers(2**63)))
        np.random.seed(int(rng.integers(2**32)))  # timm picks the ops with np.random.choice
        try:
            return op(img)
        finally:
            random.setstate(saved)
            np.random.set_state(saved_np)

    apply.op = op  # (for tests)
    return apply


def make_transform(resolution: int, augment: str, crop_min_scale: float = 0.08, crop_pct: float = 0.875,
                   randaug: str = "") -> Callable[[Image.Image | np.ndarray, np.random.Generator], torch.Tensor]:
    """(image, rng) -> (3, res, res) uint8. augment: none (eval: resize + centre crop), flip, rrc (+ flip);
    randaug: a timm RandAugment spec applied after them ('' = none)."""
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    ra = rand_augment(randaug, resolution) if randaug else None

    def transform(img, rng: np.random.Generator) -> torch.Tensor:
        if isinstance(img, np.ndarray):
            if img.shape[:2] == (resolution, resolution) and augment != "rrc" and ra is None:
                if augment == "flip" and rng.random() < 0.5:
                    img = img[:, ::-1]
                return to_tensor(img)
            img = Image.fromarray(img)
        if augment == "rrc":
            left, top, cw, ch = _random_resized_crop(*img.size, rng, (crop_min_scale, 1.0))
            img = img.resize((resolution, resolution), Image.BICUBIC, box=(left, top, left + cw, top + ch))
        else:
            img = _center(img, resolution, crop_pct)
        if augment in ("flip", "rrc") and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if ra is not None:
            img = ra(img, rng)
        return to_tensor(img)

    return transform


def normalize(images: torch.Tensor, device: torch.device, channels_last: bool = False,
              mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(N, 3, H, W) uint8 (any device) -> float32 normalised on `device` (channels-last if asked).
    Video clips (N, 3, T, H, W) are normalised the same way (channels-last applies to 4-D images only)."""
    x = images.to(device, non_blocking=True).float().div_(255)
    shape = (1, 3) + (1,) * (x.dim() - 2)  # broadcast over (H, W) or (T, H, W)
    m = torch.tensor(mean, device=device).view(shape)
    s = torch.tensor(std, device=device).view(shape)
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
