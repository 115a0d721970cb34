"""DiT (Peebles & Xie, arXiv 2212.09748), issue 20 item 8: sample quality against model compute, and guidance.

The paper (Sec. 5.1, Fig. 2 and 6, Table 4): at a fixed model width, a smaller patch (more tokens, more
Gflops) gives a better FID all along training (DiT-S/8 > S/4 > S/2 in FID); classifier-free guidance makes
samples look more like their class (the FID of DiT-XL/2 drops from 9.62 to 2.27 with scale 1.5).

Here: the `dit` shapes preset (16 px, label = colour, hidden 128, 4 blocks, 1200 steps of 32) with patch 8,
4 and 2 (4, 16 and 64 tokens). Each model draws 50 samples per class (DDIM, 50 steps, eta 0) at guidance
scale 1 and 4, from the same noise for every model of a seed. A proxy for FID, documented as such:

- the Frechet distance (FD) between Gaussians fitted to a classifier's features of the samples and of as
  many held-out real images (Heusel et al.'s formula, as FID, with a small `shapes` classifier in place of
  Inception). The classifier is `kfe train supervised` (the shapes preset's ConvNeXt V2, 0.2M parameters)
  trained once on label shape_color (64 classes, so its features carry shape as well as colour) at 32 px;
  DiT's 16 px images, samples and real ones alike, are upsampled x2 (bilinear) before it. Its features are
  the 128-d pooled, normalised ones before the head. The FD of two disjoint real sets of the same size is the
  floor (FD's estimate is biased upwards at this sample size), reported beside it.
- the share of samples the classifier puts in the class they were drawn for (its colour: the probabilities
  of the 64 classes summed over shapes), with its accuracy on the real images as the ceiling.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch
import torch.nn.functional as F

from train.papers import Arm, Paper, register

SIDE, CLASSIFIER_SIDE = 16, 32
SCALES = (1.0, 4.0)  # classifier-free guidance scales compared (DiT's unguided and its samples' 4.0)
PER_CLASS, SAMPLE_STEPS = 50, 50  # samples per class; DDIM steps
SMOKE_PER_CLASS, SMOKE_SAMPLE_STEPS = 2, 2
CLASSIFIER = ("--shapes.label", "shape_color", "--shapes.val_size", "1000", "--steps", "4000", "--eval_every",
              "1000", "--ckpt_every", "1000", "--num_workers", "0", "--seed", "0", "--resume", "auto")


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) of Gaussians fitted to the rows of a and b.
    tr (S_a S_b)^1/2 = sum of sqrt(eigenvalues of S_a^1/2 S_b S_a^1/2), a symmetric PSD matrix: no sqrtm."""
    a, b = a.double(), b.double()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (N >= 2, D) feature sets of the same D, got {tuple(a.shape)} and {tuple(b.shape)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))  # D = 1: cov is 0-d
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * cross)


class Classifier:
    """A `kfe train supervised` checkpoint on shapes (label shape_color) as a feature extractor."""

    def __init__(self, run_dir: str):
        from train.run import load_for_eval

        _, cfg, data, _, self.module, self.prepare, _, _ = load_for_eval(run_dir)
        if cfg.shapes.label != "shape_color" or cfg.resolution != CLASSIFIER_SIDE:
            raise ValueError(f"{run_dir}: expected a shape_color classifier at {CLASSIFIER_SIDE} px, got "
                             f"{cfg.shapes.label} at {cfg.resolution} px")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, 16, 16) uint8 -> (features (N, D), colour probabilities (N, 8))."""
        feats, colours = [], []
        for chunk in images.split(batch):
            up = F.interpolate(chunk.float(), scale_factor=CLASSIFIER_SIDE // SIDE, mode="bilinear",
                               align_corners=False).round().clamp(0, 255).to(torch.uint8)
            x = self.prepare({"image": up})["image"]
            f = self.module.forward_features(x)
            p = self.module.head(f).softmax(-1).view(len(x), 8, 8).sum(1)  # class = shape * 8 + colour
            feats.append(f.cpu())
            colours.append(p.cpu())
        return torch.cat(feats), torch.cat(colours)


@functools.lru_cache(maxsize=2)
def _classifier(run_dir: str) -> Classifier:
    return Classifier(run_dir)


@functools.lru_cache(maxsize=4)
def real_images(n: int, start: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out shapes images [start, start + n) at 16 px (uint8, N x 3 x H x W) and their colour labels."""
    from train.data.shapes import Shapes

    ds = Shapes("val", start + n, SIDE, "color", seed)
    items = [ds[i] for i in range(start, start + n)]
    x = torch.from_numpy(np.stack([it["image"] for it in items])).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor([it["label"] for it in items])


def draw(run_dir: str, classes: torch.Tensor, scale: float, steps: int, seed: int) -> tuple[torch.Tensor, float]:
    """Samples of a DiT run (EMA weights once caught up, as `kfe sample dit`) as uint8 images, and the model's
    multiply-adds per forward in millions (DiT's "Gflops" count multiply-adds)."""
    import models
    from train.recipes import dit
    from train.sample import guided, load_model

    model, cfg, _, _ = load_model(run_dir)
    size = model.x_embedder.img_size
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(classes), model.in_channels, size, size, generator=gen)
    with torch.no_grad():
        x = dit.diffusion(cfg).respaced(steps).sample(guided(model, classes, scale), noise, "ddim", clip=True,
                                                      generator=gen)
    one = (torch.zeros(1, model.in_channels, size, size), torch.zeros(1, dtype=torch.long),
           torch.zeros(1, dtype=torch.long))
    mmacs = models.count_flops(model, inputs=one, device="cpu") / 1e6
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), mmacs


def score(run: dict, smoke: bool, paths: dict[str, str]) -> dict[str, float]:
    """FD to real images and the classifier's accuracy on the sampled classes, at each guidance scale."""
    per_class, steps = (SMOKE_PER_CLASS, SMOKE_SAMPLE_STEPS) if smoke else (PER_CLASS, SAMPLE_STEPS)
    clf = _classifier(paths["{classifier}"])
    n = 8 * per_class
    real, real_y = real_images(n)
    real_f, real_p = clf(real)
    floor_f, _ = clf(real_images(n, start=n)[0])
    out = {"fd_real": frechet_distance(real_f, floor_f),
           "acc_real": float((real_p.argmax(1) == real_y).float().mean()), "n": n}
    classes = torch.arange(8).repeat_interleave(per_class)
    for s in SCALES:
        images, out["mmacs"] = draw(run["run_dir"], classes, s, steps, 10_000 + run["seed"])
        feats, probs = clf(images)
        out[f"fd_cfg{s:g}"] = frechet_distance(feats, real_f)
        out[f"acc_cfg{s:g}"] = float((probs.argmax(1) == classes).float().mean())
    return out


def prepare(folder: str, smoke: bool) -> dict[str, str]:
    """Train (or read back) the measuring classifier once, shared by every arm and seed."""
    from train.papers.runner import SMOKE, _train_or_read

    run_dir = os.path.join(folder, "classifier")
    overrides = ["--out", run_dir, *CLASSIFIER, *(SMOKE if smoke else ())]
    _train_or_read("supervised", overrides, run_dir, quiet=True)
    return {"{classifier}": run_dir}


def _cfg_effect(runs: list[dict]) -> tuple[dict, list[str]]:
    """Guidance 4 vs 1 within each model (paired by seed: same model, same noise), and the real-image bounds."""
    from train.papers.report import _stats

    scored = [r for r in runs if "score" in r]
    if not scored:
        return {}, []
    hi, lo = (f"{SCALES[1]:g}", f"{SCALES[0]:g}")
    data, lines = {"cfg": {}}, ["", f"Guidance scale {hi} vs {lo} (same model, same noise), per arm:", "",
                                "| arm | class accuracy Δ (points) | FD Δ | seeds |", "|---|---|---|---|"]
    for arm in dict.fromkeys(r["arm"] for r in scored):
        mine = [r["score"] for r in scored if r["arm"] == arm]
        acc = _stats([s[f"acc_cfg{hi}"] - s[f"acc_cfg{lo}"] for s in mine])
        fd = _stats([s[f"fd_cfg{hi}"] - s[f"fd_cfg{lo}"] for s in mine])
        data["cfg"][arm] = {"acc_delta": acc, "fd_delta": fd}
        lines.append(f"| {arm} | {100 * acc[0]:+.1f} ± {100 * acc[1]:.1f} | {fd[0]:+.2f} ± {fd[1]:.2f} "
                     f"| {len(mine)} |")
    first = scored[0]["score"]
    data["real"] = {"fd_floor": first["fd_real"], "acc_ceiling": first["acc_real"], "n": first["n"]}
    lines += ["", f"Bounds of the proxy ({first['n']} images per set): FD between two disjoint held-out real sets "
                  f"{first['fd_real']:.2f} (the floor); the classifier's colour accuracy on real held-out images "
                  f"{100 * first['acc_real']:.1f}% (the ceiling)."]
    return data, lines


def _plot_fd_vs_compute(ax, runs: list[dict]) -> None:
    for s, marker in zip(SCALES, "os"):
        pts = [(r["score"]["mmacs"], r["score"][f"fd_cfg{s:g}"]) for r in runs if "score" in r]
        if pts:
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, marker=marker, label=f"cfg {s:g}")
    for r in runs:
        if "score" in r and r["seed"] == runs[0]["seed"]:
            ax.annotate(r["arm"], (r["score"]["mmacs"], r["score"][f"fd_cfg{SCALES[0]:g}"]), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("M multiply-adds per forward (log)")
    ax.set_ylabel("FD, classifier features (log; lower = better)")
    ax.set_title("sample quality vs model compute", fontsize=9)
    ax.legend()


_MODEL = '{"hidden_size": 128, "depth": 4, "num_heads": 4}'
register(Paper(
    name="dit", title="DiT-S/8 vs S/4 vs S/2 (more tokens), guidance 1 vs 4",
    claim="more tokens (smaller patches, more Gflops) give better samples (lower FID) at equal steps; "
          "classifier-free guidance makes samples match their class",
    arms=(Arm("S-8", "dit", ("--model", "dit_s_8", "--model_kwargs", _MODEL)),
          Arm("S-4", "dit", ("--model", "dit_s_4", "--model_kwargs", _MODEL)),
          Arm("S-2", "dit", ("--model", "dit_s_2", "--model_kwargs", _MODEL), baseline="S-4")),
    metric="mse", percent=False, steps=1200, eval_every=300, seeds=(0, 1), prepare=prepare, score=score,
    score_columns=(("mmacs", "MMACs", False), ("fd_cfg1", "FD cfg 1", False), ("fd_cfg4", "FD cfg 4", False),
                   ("acc_cfg1", "class acc. cfg 1 %", True), ("acc_cfg4", "class acc. cfg 4 %", True)),
    analyze=_cfg_effect, plot_extra=_plot_fd_vs_compute,
    notes="the dit shapes preset (16 px, label colour, hidden 128, 4 blocks, batch 32, 1200 steps) at patch 8 / 4 "
          "/ 2; metric: held-out eps-MSE (lower = better); samples: 50 per class, DDIM 50 steps, EMA weights; FD "
          "and class accuracy from a shapes classifier (a proxy for FID, not FID: train/papers/dit_paper.py)"))
