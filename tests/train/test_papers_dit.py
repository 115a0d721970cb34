"""The DiT paper's measurements (train/papers/dit_paper.py): the Frechet distance against a float64 reference,
the colour read from the 64-class classifier, score columns in the tables, and scores cached per checkpoint."""
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings, strategies as st

from train.papers import PAPERS, Arm, Paper, report, runner
from train.papers import dit_paper


def _fd_reference(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's matrix square root (as FID implementations compute it)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(8, 40), m=st.integers(8, 40), d=st.integers(1, 6), seed=st.integers(0, 2 ** 16),
       shift=st.floats(0, 3), scale=st.floats(0.2, 3))
def test_frechet_distance_matches_the_scipy_reference(n, m, d, seed, shift, scale):
    g = np.random.default_rng(seed)
    a = g.normal(size=(n, d)) @ g.normal(size=(d, d))
    b = scale * g.normal(size=(m, d)) + shift
    ref = _fd_reference(a, b)
    got = dit_paper.frechet_distance(torch.from_numpy(a), torch.from_numpy(b))
    assert abs(got - ref) <= 1e-6 * max(abs(ref), 1.0)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_a_shift_adds_its_square():
    a = torch.randn(200, 5, dtype=torch.float64)
    assert abs(dit_paper.frechet_distance(a, a)) < 1e-8
    shifted = a + torch.tensor([3.0, 0, 0, 4.0, 0], dtype=torch.float64)
    assert dit_paper.frechet_distance(a, shifted) == pytest.approx(25.0, rel=1e-8)
    with pytest.raises(ValueError, match="same D"):
        dit_paper.frechet_distance(a, torch.randn(10, 4))


def test_the_classifiers_colour_is_its_64_classes_summed_over_shapes():
    # shape_color class k is (shape k // 8, colour k % 8): the view the Classifier sums over must say so.
    from train.data.shapes import COLOR_NAMES, SHAPES, class_names

    names = class_names("shape_color")
    assert all(names[s * 8 + c] == f"{COLOR_NAMES[c]} {SHAPES[s]}" for s in range(8) for c in range(8))

    class Head(torch.nn.Module):  # a "classifier" sure of class 8 * 3 + 5 (colour 5) for every image
        def forward_features(self, x):
            return x.flatten(1)[:, :4]

        def head(self, f):
            out = torch.full((len(f), 64), -30.0)
            out[:, 8 * 3 + 5] = 30.0
            return out

    clf = dit_paper.Classifier.__new__(dit_paper.Classifier)
    clf.module, clf.prepare = Head(), (lambda b: {"image": b["image"].float()})
    feats, colours = clf(torch.zeros(3, 3, 16, 16, dtype=torch.uint8))
    assert feats.shape == (3, 4) and colours.shape == (3, 8)
    assert colours.argmax(1).tolist() == [5, 5, 5] and torch.allclose(colours.sum(1), torch.ones(3))


def test_real_images_are_the_held_out_split_at_16_px():
    x, y = dit_paper.real_images(6, start=3)
    from train.data.shapes import Shapes

    ds = Shapes("val", 9, 16, "color", 0)
    assert x.shape == (6, 3, 16, 16) and x.dtype == torch.uint8
    assert torch.equal(x[0], torch.from_numpy(ds[3]["image"]).permute(2, 0, 1)) and y.tolist()[0] == ds[3]["label"]


def test_score_columns_and_effects_reach_the_table():
    cols = (("mmacs", "MMACs", False), ("acc", "acc %", True))
    paper = Paper("p", "t", "c", (Arm("a", "dit"), Arm("b", "dit")), "mse", 10, 5, percent=False,
                  score_columns=cols)
    runs = [{"arm": arm, "seed": s, "steps": 10, "final": loss, "curve": [(10, loss)],
             "score": {"mmacs": macs, "acc": acc}}
            for arm, macs, loss, accs in (("a", 4.0, 0.5, (0.5, 0.7)), ("b", 16.0, 0.25, (0.9, 0.9)))
            for s, acc in enumerate(accs)]
    s = report.summarize(paper, runs)
    assert s["arms"]["a"]["scores"]["acc"][0] == pytest.approx(0.6)
    delta, spread = s["effects"]["b - a"]["scores"]["acc"]
    assert delta == pytest.approx(0.3) and spread == pytest.approx(math.sqrt(0.02))
    md = report.markdown(s, "cmd")
    assert "| a | 4.00 ± 0.00 | 60.0 ± 14.1 |" in md and "| b - a | +12.00 (higher) | +30.0 (higher) |" in md
    assert "| mse (mean ± std) |" in md and "| a | 10 | 0,1 | 0.5000 ± 0.0000 |" in md and "| b - a | -0.2500 |" in md


@pytest.mark.slow  # ~15 s: three 4-step DiTs, a 4-step classifier, 16 samples per guidance scale
def test_smoke_dit_scores_every_arm_once_per_checkpoint(tmp_path, monkeypatch):
    from train import cli

    out = str(tmp_path / "papers")
    assert cli.main(["bench", "papers", "dit", "--smoke", "--out", out]) == 0
    result = json.load(open(os.path.join(out, "dit.json")))
    assert [r["arm"] for r in result["runs"]] == ["S-8", "S-4", "S-2"]
    macs = [r["score"]["mmacs"] for r in result["runs"]]
    assert macs[0] < macs[1] < macs[2]  # more tokens, more compute, at the same width
    for r in result["runs"]:
        sc = r["score"]
        assert sc["step"] == 4 and sc["n"] == 16
        assert all(math.isfinite(sc[k]) and sc[k] >= 0 for k in ("fd_cfg1", "fd_cfg4", "fd_real"))
        assert all(0.0 <= sc[k] <= 1.0 for k in ("acc_cfg1", "acc_cfg4", "acc_real"))
    md = open(os.path.join(out, "dit.md")).read()
    assert "| S-2 - S-4 |" in md and "Guidance scale 4 vs 1" in md and "FD between two disjoint" in md

    # A rerun reads the scores back; a score of another step than the run's is measured again.
    calls = []
    paper = dataclasses.replace(PAPERS["dit"], score=lambda run, smoke, paths: calls.append(run["arm"]) or {"x": 1})
    monkeypatch.setitem(PAPERS, "dit", paper)
    assert cli.main(["bench", "papers", "dit", "--smoke", "--out", out]) == 0
    assert calls == []
    path = os.path.join(out, "runs", "dit", "S-4", "seed0", "score.json")
    stale = json.load(open(path))
    json.dump({**stale, "step": 3}, open(path, "w"))
    run = runner.run_arm(paper, paper.arms[1], 0, os.path.join(out, "runs"), smoke=True,
                         paths={"{classifier}": "unused"})
    assert calls == ["S-4"] and run["score"] == {"step": 4, "x": 1}
