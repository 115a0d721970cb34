"""Evaluation helpers: k-NN and linear probe recover separable classes and sit at chance on noise;
top-1 counts over ranks; Mixup/CutMix targets."""
import math

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
    assert out == {"top1": 0.75, "chance": 0.5, "n": 4, "class_top1": [0.5, 1.0, 1.0]}
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


# ---- k-NN, linear probe, features: against written-out computations

def _knn_brute(train_x, train_y, test_x, num_classes, k, temperature):
    """DINO's weighted k-NN, one test sample at a time in float64: the k most cosine-similar training
    samples vote for their class with weight exp(sim / T)."""
    tr = train_x.double() / train_x.double().norm(dim=1, keepdim=True)
    preds = []
    for x in test_x.double():
        sim = tr @ (x / x.norm())
        order = sorted(range(len(sim)), key=lambda j: -float(sim[j]))[:k]
        votes = [0.0] * num_classes
        for j in order:
            votes[int(train_y[j])] += math.exp(float(sim[j]) / temperature)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(preds)


@pytest.mark.parametrize("k, temperature, chunk", [(20, 0.07, 1024), (5, 0.5, 7), (1, 0.07, 3)])
def test_knn_matches_the_brute_force_weighted_vote(k, temperature, chunk):
    xtr, ytr = _blobs(120, spread=5.0)
    xte, yte = _blobs(40, spread=5.0, seed=1)
    want = int((_knn_brute(xtr, ytr, xte, 4, k, temperature) == yte).sum()) / len(yte)
    assert 0.3 < want < 1.0                                   # overlapping blobs: some errors to get right
    assert knn_top1(xtr, ytr, xte, yte, num_classes=4, k=k, temperature=temperature, chunk=chunk) == want


def test_knn_votes_are_weighted_by_similarity():
    # two neighbours of class 0 at cosine 0.6, one of class 1 at 0.99: exp(sim / 0.07) lets class 1 win;
    # a plain majority (or a very large temperature) would pick class 0
    q = torch.tensor([[1.0, 0.0]])
    train = torch.tensor([[0.6, 0.8], [0.6, -0.8], [0.99, (1 - 0.99 ** 2) ** 0.5]])
    labels = torch.tensor([0, 0, 1])
    assert knn_top1(train, labels, q, torch.tensor([1]), num_classes=2, k=3, temperature=0.07) == 1.0
    assert knn_top1(train, labels, q, torch.tensor([0]), num_classes=2, k=3, temperature=100.0) == 1.0
    assert knn_top1(train, labels, q * 5, torch.tensor([1]), num_classes=2, k=3) == 1.0   # cosine: scale-free
    with pytest.raises(ValueError, match="non-empty"):
        knn_top1(train[:0], labels[:0], q, torch.tensor([1]), num_classes=2)


def test_linear_probe_standardises_features_and_is_seeded():
    """MAE's probe: affine-free BatchNorm on the features, so a per-dimension scale and shift of the
    features changes nothing; the same seed gives the same accuracy."""
    xtr, ytr = _blobs(200, spread=1.0)
    xte, yte = _blobs(100, spread=1.0, seed=1)
    acc = linear_probe(xtr, ytr, xte, yte, num_classes=4, epochs=10, seed=3)
    assert acc == linear_probe(xtr, ytr, xte, yte, num_classes=4, epochs=10, seed=3)
    scale, shift = torch.logspace(-3, 3, 16), torch.randn(16) * 100
    assert linear_probe(xtr * scale + shift, ytr, xte * scale + shift, yte, num_classes=4, epochs=10,
                        seed=3) == pytest.approx(acc, abs=0.02)
    with pytest.raises(ValueError, match="non-empty"):
        linear_probe(xtr[:0], ytr[:0], xte, yte, num_classes=4)


def test_features_and_top1_over_several_batches():
    from train.eval import features

    batches = [{"x": torch.full((3, 2), float(i)), "label": torch.tensor([i, i, -1])} for i in range(3)]
    seen = []
    feats, labels = features(lambda b: b["x"] * 2, batches, lambda b: seen.append(1) or b, DistInfo())
    assert len(seen) == 3 and feats.shape == (9, 2) and feats.dtype == torch.float32
    assert torch.equal(feats[:, 0], torch.tensor([0.0, 0, 0, 2, 2, 2, 4, 4, 4]))
    assert torch.equal(labels, torch.tensor([0, 0, -1, 1, 1, -1, 2, 2, -1]))
    out = top1(lambda b: torch.nn.functional.one_hot(b["label"].clamp_min(0), 3).float(), batches, lambda b: b,
               DistInfo(), num_classes=3)
    assert out == {"top1": 1.0, "chance": 1 / 3, "n": 6, "class_top1": [1.0, 1.0, 1.0]}      # unlabelled (-1) samples count nowhere
