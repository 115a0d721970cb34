"""Evaluation helpers: k-NN and linear probe recover separable classes and sit at chance on noise;
top-1 counts over ranks; Mixup/CutMix targets."""
import pytest
import torch

from train.dist import DistInfo
from train.eval import chance, knn_top1, linear_probe, top1
from train.mixup import MixupCutmix, smooth_one_hot


def _blobs(n, classes=4, dim=16, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 2
    y = torch.randint(classes, (n,), generator=g)
    return centers[y] + spread * torch.randn(n, dim, generator=g), y


@pytest.mark.parametrize("probe", ["knn", "linear"])
def test_probes_separate_blobs_and_fail_on_noise(probe):
    xtr, ytr = _blobs(400)
    xte, yte = _blobs(200, seed=1)
    run = (lambda *a: knn_top1(*a, num_classes=4)) if probe == "knn" else (
        lambda *a: linear_probe(*a, num_classes=4, epochs=30))
    assert run(xtr, ytr, xte, yte) > 0.95
    shuffled = ytr[torch.randperm(400, generator=torch.Generator().manual_seed(5))]
    assert run(xtr, shuffled, xte, yte) < 0.45          # labels carry no signal: about chance (0.25)


def test_top1_and_chance():
    batches = [{"x": torch.eye(3)[[0, 1, 2, 2]], "label": torch.tensor([0, 1, 2, 0])}]
    out = top1(lambda b: b["x"], batches, lambda b: b, DistInfo(), num_classes=3)
    assert out == {"top1": 0.75, "chance": 0.5, "n": 4}
    assert chance(torch.tensor([1, 1, 1, 0]), 2) == 0.75
    with pytest.raises(ValueError, match="no labelled samples"):
        top1(lambda b: b["x"], [], lambda b: b, DistInfo(), num_classes=3)


def test_mixup_cutmix_targets():
    torch.manual_seed(0)
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    for mixup, cutmix in ((1.0, 0.0), (0.0, 1.0)):
        mixed, t = MixupCutmix(4, mixup, cutmix, smoothing=0.1)(x, y)
        assert torch.allclose(t.sum(1), torch.ones(4)) and mixed.shape == x.shape
        lam = float(t[0, 0] - 0.1 / 4) / 0.9 if t[0, 0] > t[0, 3] else None
        if cutmix and lam is not None:          # the pixels taken from the flipped batch match 1 - lam
            from_other = (mixed[0] != x[0]).any(0).float().mean()
            assert float(from_other) == pytest.approx(1 - lam, abs=1e-6)
    assert torch.equal(smooth_one_hot(torch.tensor([1]), 2, 0.0), torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="mixup/cutmix alphas"):
        MixupCutmix(4, mixup=-1)


# ---- Mixup / CutMix target values (not only their sums), against a written-out formula and timm

def _lam_from_pixels(x, mixed, cutmix):
    """The mixing weight the images show: Mixup's blend factor, or CutMix's untouched-area fraction."""
    flipped = x.flip(0)
    if cutmix:
        pasted = (mixed != x).any(1)                          # (N, H, W) pixels from the flipped batch
        assert torch.equal(mixed[:, :, pasted[0]], flipped[:, :, pasted[0]])   # one box, the same in every image
        return 1 - float(pasted[0].float().mean())
    d = x - flipped                                           # least squares of mixed - flipped = lam * d
    return float(((mixed - flipped) * d).sum() / (d * d).sum())


def check_mixed_targets(x, y, mixed, t, num_classes, smoothing, cutmix):
    """Soft targets = lam * smoothed one-hot(y) + (1 - lam) * smoothed one-hot(flipped y), with the lam
    the images show (CutMix: the area actually pasted); values written out, and as timm computes them."""
    lam = _lam_from_pixels(x, mixed, cutmix)
    off, on = smoothing / num_classes, 1 - smoothing + smoothing / num_classes
    want = torch.full((len(y), num_classes), off, dtype=torch.float64)
    for i in range(len(y)):
        want[i, y[i]] += lam * (on - off)
        want[i, y[len(y) - 1 - i]] += (1 - lam) * (on - off)
    torch.testing.assert_close(t.double(), want, rtol=0, atol=1e-6)
    from timm.data.mixup import mixup_target

    torch.testing.assert_close(t, mixup_target(y, num_classes, lam, smoothing), rtol=0, atol=1e-6)
    return lam


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0)])
def test_mixup_cutmix_target_values(seed, mixup, cutmix):
    pytest.importorskip("timm")
    torch.manual_seed(seed)
    x, y = torch.rand(6, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 1])
    mixed, t = MixupCutmix(5, mixup, cutmix, smoothing=0.1)(x, y)
    lam = check_mixed_targets(x, y, mixed, t, 5, 0.1, cutmix > 0)
    assert 0 < lam < 1


def test_mixup_prob_zero_leaves_images_and_smoothed_labels():
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    mixed, t = MixupCutmix(3, 0.8, 1.0, prob=0.0, smoothing=0.3)(x, y)
    assert torch.equal(mixed, x)
    torch.testing.assert_close(t, torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.8, 0.1, 0.1]]))


def test_target_check_fails_on_swapped_weights_and_an_uncorrected_cutmix_lam():
    """Mutants the sum-to-one test let through: lam and 1 - lam swapped; CutMix's drawn lam kept instead
    of the area actually pasted (a box clipped at the border)."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    x, y = torch.rand(6, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 1])
    mixed, t = MixupCutmix(5, 0.8, 0.0, smoothing=0.1)(x, y)
    smooth = smooth_one_hot(y, 5, 0.1)
    lam = _lam_from_pixels(x, mixed, False)
    with pytest.raises(AssertionError):
        check_mixed_targets(x, y, mixed, smooth * (1 - lam) + smooth.flip(0) * lam, 5, 0.1, False)
    x0 = x.clone()
    x0[..., :4, :4] = x.flip(0)[..., :4, :4]                  # a 4x4 box: 1/16 pasted; the draw said 1/4
    with pytest.raises(AssertionError):
        check_mixed_targets(x, y, x0, smooth * 0.75 + smooth.flip(0) * 0.25, 5, 0.1, True)
