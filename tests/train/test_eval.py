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
