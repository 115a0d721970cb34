"""The per-sample augmentations against torchvision (the reference implementations the papers used):
RandomResizedCrop's scale / aspect ranges, the eval resize + centre crop, SimCLR's colour jitter and
Gaussian blur (train/data/transforms.py, train/data/simclr.py)."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from train.data.simclr import color_jitter, gaussian_blur
from train.data.transforms import _center, _random_resized_crop, make_transform

tvF = pytest.importorskip("torchvision.transforms.functional")
T = pytest.importorskip("torchvision.transforms")


def _crops(draw, n=3000):
    boxes = np.array([draw(i) for i in range(n)], dtype=np.float64)   # (left, top, width, height)
    return boxes[:, 2] * boxes[:, 3], boxes[:, 2] / boxes[:, 3]


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.5, 1.0)])
def test_random_resized_crop_scale_and_aspect_match_torchvision(scale):
    """Same ranges and the same distribution as torchvision's get_params (area ~ U(scale), log-aspect
    ~ U(log 3/4, log 4/3), 10 tries then the centre), compared by quantiles over 3000 draws."""
    w, h = 200, 160
    rng = np.random.default_rng(0)
    area, aspect = _crops(lambda i: _random_resized_crop(w, h, rng, scale))
    torch.manual_seed(0)
    img = torch.zeros(1, h, w)
    ref = _crops(lambda i: T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])[::-1][:2][::-1]
                 + T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])[2:][::-1])
    frac, ref_frac = area / (w * h), ref[0] / (w * h)
    assert frac.min() >= scale[0] - 0.01 and frac.max() <= 1.0
    assert np.all(np.abs(np.log(aspect)) <= math.log(4 / 3) + 0.02)
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert abs(np.quantile(frac, q) - np.quantile(ref_frac, q)) < 0.03, q
        assert abs(np.quantile(np.log(aspect), q) - np.quantile(np.log(ref[1]), q)) < 0.03, q


def test_random_resized_crop_falls_back_to_the_centre_as_torchvision():
    rng = np.random.default_rng(0)           # no crop of 0.9-1.0 area at aspect >= 3 fits a 300 x 30 strip
    box = _random_resized_crop(300, 30, rng, (0.9, 1.0), ratio=(3.0, 4.0))
    assert box == (90, 0, 120, 30)           # aspect 10 > 4: the widest allowed crop, 120 x 30, centred
    img = torch.zeros(1, 30, 300)
    top, left, ch, cw = T.RandomResizedCrop.get_params(img, [0.9, 1.0], [3.0, 4.0])
    assert box == (left, top, cw, ch)


@pytest.mark.parametrize("size, res, crop_pct", [((200, 150), 64, 0.875), ((97, 131), 32, 0.875),
                                                 ((224, 224), 56, 1.0)])
def test_eval_crop_is_torchvisions_resize_then_center_crop(size, res, crop_pct):
    """Eval transform (ConvNeXt / timm): resize the shorter side to res / crop_pct (bicubic), centre crop."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours = np.asarray(_center(img, res, crop_pct), dtype=np.int64)
    ref = T.CenterCrop(res)(T.Resize(int(res / crop_pct), T.InterpolationMode.BICUBIC)(img))   # ConvNeXt's eval
    assert ours.shape == (res, res, 3)
    assert np.array_equal(ours, np.asarray(ref, dtype=np.int64))
    out = make_transform(res, "none", crop_pct=crop_pct)(img, rng)      # the transform the recipes use
    assert torch.equal(out, torch.from_numpy(ours.astype(np.uint8).transpose(2, 0, 1)))


def _jitter_reference(x, seed, b=0.4, c=0.4, s=0.4, h=0.1):
    """torchvision's adjust_* in the order and with the factors color_jitter draws from the same seed."""
    rng = np.random.default_rng(seed)
    out = torch.from_numpy(x)
    for op in rng.permutation(4):
        if op == 0:
            out = tvF.adjust_brightness(out, rng.uniform(1 - b, 1 + b))
        elif op == 1:
            out = tvF.adjust_contrast(out, rng.uniform(1 - c, 1 + c))
        elif op == 2:
            out = tvF.adjust_saturation(out, rng.uniform(1 - s, 1 + s))
        else:
            out = tvF.adjust_hue(out, rng.uniform(-h, h))
    return out.numpy()


@pytest.mark.parametrize("seed", range(6))
def test_color_jitter_matches_torchvision(seed):
    x = np.random.default_rng(100 + seed).random((3, 12, 12)).astype(np.float32)
    ours = color_jitter(x, np.random.default_rng(seed))
    ref = _jitter_reference(x, seed)
    assert np.abs(ref - x).max() > 0.01                                  # the jitter does change the image
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert rel < 1e-3 and np.abs(ours - ref).max() < 5e-3, (rel, np.abs(ours - ref).max())   # grey weights 0.299 vs 0.2989


@pytest.mark.parametrize("sigma", [0.3, 1.0, 1.7])
def test_gaussian_blur_matches_torchvision(sigma):
    x = np.random.default_rng(0).random((3, 16, 20)).astype(np.float32)
    r = max(1, math.ceil(3 * sigma))
    ref = tvF.gaussian_blur(torch.from_numpy(x), [2 * r + 1, 2 * r + 1], [sigma, sigma]).numpy()
    ours = gaussian_blur(x, sigma)
    assert np.abs(ref - x).max() > 0.01
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
