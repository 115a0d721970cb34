"""`mae`: masked-autoencoder pre-training of a ViT (He et al., arXiv 2111.06377), and long-sequence MAE
(Hu et al., arXiv 2210.07224) through `mask_unit` (pixels; a multiple of the patch size).

Defaults are MAE's pre-training setting (Appendix A.1, Table 8): AdamW betas (0.9, 0.95), weight decay
0.05, base lr 1.5e-4 with lr = blr * batch / 256, batch 4096, 40 warmup epochs then cosine, 800 epochs
(the ablations' length; the released models trained 1600), RandomResizedCrop scale (0.2, 1.0) + flip,
mask ratio 0.75, normalised-pixel loss; ViT-L/16 (the paper's main encoder). Labels are never used for
training.

Evaluation (self-supervised, Sec. 4): the held-out reconstruction loss at fixed masks, and, when the
data has labels, k-NN and linear-probe top-1 of the encoder's features (no masking; the cls token, as
MAE's linear probe, or the mean patch token) on `probe_samples` training images, printed next to
chance and to the same probes on raw pixels (what the encoder must beat to have learnt anything).

The `shapes` preset is a CPU run of a couple of minutes: a 0.6M-parameter MAE (ViT dim 96, 4 blocks,
patch 4, decoder dim 64 x 2 blocks) on 32 px shapes, batch 64.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

import models
from train import data as data_mod
from train.config import ConfigError, opt
from train.data import DataError, eval_batches
from train.dist import DistInfo, all_reduce_sum
from train.eval import chance, features, knn_top1, linear_probe, percent, seeded
from train.recipes.base import Data, Recipe, Task, TrainConfig, register


@dataclass
class MAEConfig(TrainConfig):
    model: str = opt("mae_vit_large", "registered MAE (mae_vit_{base,large,huge})")
    model_kwargs: dict = opt({}, "create_model overrides, e.g. {\"embed_dim\": 96, \"depth\": 4, \"num_heads\": 3}")
    mask_ratio: float = opt(0.75, "fraction of patches removed")
    mask_unit: int = opt(0, "mask unit side in pixels, a multiple of the patch size (0 = one patch; "
                            "long-sequence MAE: e.g. 32 for 2x2 patches of 16)")
    norm_pix_loss: bool = opt(True, "regress per-patch normalised pixels (MAE Table 1d)")
    feature_pool: Literal["cls", "mean", "grid", "tokens"] = opt(
        "cls", "probe features: the cls token (MAE's linear probe), the mean patch token, grid: the patch tokens "
               "averaged to a 4 x 4 grid and concatenated (keeps where things are, one size for any patch size), "
               "or tokens: every patch token concatenated (the full-resolution map dense tasks use)")
    probe_samples: int = opt(5000, "training images the k-NN / linear probe fit (0 = no probes)")
    eval_samples: int = opt(2000, "held-out images for the reconstruction loss and the probes")
    # MAE Table 8
    batch_size: int = opt(4096, "global batch per optimizer step (all ranks x accumulation)")
    epochs: float = opt(800.0, "training length in epochs (ignored when steps > 0)")
    warmup_epochs: float = opt(40.0, "linear warmup length in epochs")
    blr: float = opt(1.5e-4, "base lr: lr = blr * batch_size / 256")
    min_lr: float = opt(0.0, "lr at the end of the cosine")
    weight_decay: float = opt(0.05, "AdamW weight decay (not on norms / biases)")
    betas: tuple[float, ...] = opt((0.9, 0.95), "AdamW betas")
    crop_min_scale: float = opt(0.2, "RandomResizedCrop minimum area fraction")
    channels_last: bool = opt(False, "unused (a transformer)")


PRESETS = {
    # Measured here (1 thread): ~0.13 s per step; the loss falls within the first 100 steps.
    "shapes": {
        "model": "mae_vit_base",
        "model_kwargs": {"patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3, "decoder_embed_dim": 64,
                         "decoder_depth": 2, "decoder_num_heads": 2},
        "resolution": 32, "batch_size": 64, "steps": 800, "warmup_steps": 40, "blr": 4e-3, "min_lr": 1e-5,
        "feature_pool": "mean", "num_workers": 1, "log_every": 25, "eval_every": 400, "ckpt_every": 400,
        "eval_batch_size": 250, "probe_samples": 2000, "eval_samples": 1000, "shapes": {"val_size": 1000},
    },
}


def build_data(cfg: MAEConfig, info: DistInfo) -> Data:
    kind = data_mod.check(cfg.data, "data")
    if cfg.val_data:
        data_mod.check(cfg.val_data, "val_data")
    augment = cfg.augment if cfg.augment != "auto" else ("none" if kind == "shapes" else "rrc")
    train = data_mod.open_split(cfg.data, "train", resolution=cfg.resolution, fields=("image",), augment=augment,
                                seed=cfg.seed, rank=info.rank, world=info.world, shapes=cfg.shapes,
                                crop_min_scale=cfg.crop_min_scale)
    if train is None:
        raise DataError(f"--data {cfg.data!r} has no training split")
    val = data_mod.open_eval(cfg.val_data or cfg.data, resolution=cfg.resolution, fields=("image",), seed=cfg.seed,
                             rank=info.rank, world=info.world, shapes=cfg.shapes, whole=bool(cfg.val_data))
    if val is None and info.main:
        warnings.warn(f"no held-out split for {cfg.data!r} (give --val_data): training without evaluation")
    names = train.class_names or (val.class_names if val else None)
    return Data(train, val, names, ("image", "label") if names else ("image",))


def build_model(cfg: MAEConfig, device=None):
    if "img_size" in cfg.model_kwargs:
        raise ConfigError("model_kwargs must not set img_size: use --resolution")
    kw = dict(img_size=cfg.resolution, mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss,
              mask_unit=cfg.mask_unit or None, **cfg.model_kwargs)
    with torch.device(device) if device else contextlib.nullcontext():
        return models.create_model(cfg.model, **kw)


PROBE_GRID = 4  # feature_pool = grid: the token map averaged to 4 x 4 cells (16 tokens at 32 px with 8 px patches)


def grid_features(patches: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, h * w, D) patch tokens in raster order -> (B, grid * grid * D): each cell's mean token, so models
    with different patch sizes give features of one size (the position-sensitive probe of long-sequence MAE)."""
    b, n, d = patches.shape
    side = math.isqrt(n)
    if side * side != n or side % grid:
        raise ValueError(f"grid probe: {n} patch tokens are not a square grid divisible by {grid}")
    cells = patches.reshape(b, grid, side // grid, grid, side // grid, d).mean((2, 4))   # (B, grid, grid, D)
    return cells.reshape(b, grid * grid * d)


def build_task(cfg: MAEConfig, data: Data, info: DistInfo) -> Task:
    if not 0.0 <= cfg.mask_ratio < 1.0:
        raise ConfigError(f"mask_ratio must be in [0, 1), got {cfg.mask_ratio}")
    model = build_model(cfg)
    macs = models.count_flops(build_model(cfg, "meta"), (1, 3, cfg.resolution, cfg.resolution))
    n_cls = len(data.class_names) if data.class_names else 0
    probe_train = None
    if n_cls and cfg.probe_samples > 0:
        probe_train = data_mod.open_eval(cfg.data, resolution=cfg.resolution, fields=("image", "label"),
                                         seed=cfg.seed, rank=info.rank, world=info.world, shapes=cfg.shapes,
                                         split="train")
    pixel_baseline: dict = {}

    def loss(net, batch, step):
        loss_value, _, _ = net(batch["image"], cfg.mask_ratio)
        return loss_value, {}

    def embed(module, batch):
        tokens = module.forward_features(batch["image"])   # (B, 1 + L, D), nothing masked
        if cfg.feature_pool == "cls":
            return tokens[:, 0]
        if cfg.feature_pool == "mean":
            return tokens[:, 1:].mean(1)
        if cfg.feature_pool == "tokens":
            return tokens[:, 1:].flatten(1)
        return grid_features(tokens[:, 1:], PROBE_GRID)

    def batches(split, limit):
        return eval_batches(split.dataset, cfg.eval_batch_size, info.rank, info.world,
                            num_workers=min(cfg.num_workers, 2), limit=limit)

    def evaluate(module, prepare):
        if data.val is None:
            return {}
        sums = torch.zeros(2, dtype=torch.float64, device=info.device)
        with seeded(info.device, cfg.seed + 4099 * (info.rank + 1)):
            for batch in batches(data.val, cfg.eval_samples):
                x = prepare(batch)["image"]
                sums += torch.stack([module(x, cfg.mask_ratio)[0].double() * len(x),
                                     torch.tensor(float(len(x)), device=info.device, dtype=torch.float64)])
        all_reduce_sum(sums, info)
        out = {"recon_loss": float(sums[0] / sums[1].clamp_min(1)), "n": int(sums[1])}
        if probe_train is None:
            return out
        xtr, ytr = features(lambda b: embed(module, b), batches(probe_train, cfg.probe_samples), prepare, info)
        xte, yte = features(lambda b: embed(module, b), batches(data.val, cfg.eval_samples), prepare, info)
        out.update(knn_top1=knn_top1(xtr, ytr, xte, yte, n_cls), linear_top1=linear_probe(xtr, ytr, xte, yte, n_cls),
                   chance=chance(yte, n_cls), probe_train_n=int(ytr.numel()))
        if not pixel_baseline:  # the same probes on raw (normalised) pixels, computed once
            raw = lambda b: b["image"].flatten(1)  # noqa: E731
            ptr, _ = features(raw, batches(probe_train, cfg.probe_samples), prepare, info)
            pte, _ = features(raw, batches(data.val, cfg.eval_samples), prepare, info)
            pixel_baseline.update(pixel_knn_top1=knn_top1(ptr, ytr, pte, yte, n_cls),
                                  pixel_linear_top1=linear_probe(ptr, ytr, pte, yte, n_cls))
        out.update(pixel_baseline)
        return out

    return Task(model=model, loss=loss, evaluate=evaluate, embed=embed, flops_per_sample=6.0 * macs,
                describe=describe)


def describe(m: dict) -> str:
    line = f"held-out reconstruction loss {m['recon_loss']:.4f} ({m['n']} images)"
    if "knn_top1" in m:
        line += (f" | encoder k-NN {percent(m['knn_top1'])}, linear {percent(m['linear_top1'])} "
                 f"(chance {percent(m['chance'])}; raw pixels: k-NN {percent(m['pixel_knn_top1'])}, linear "
                 f"{percent(m['pixel_linear_top1'])}; {m['probe_train_n']} training images)")
    if "ema_recon_loss" in m:
        line += f" | EMA reconstruction loss {m['ema_recon_loss']:.4f}"
    return line


# kfe bench recipe mae: the shapes preset's ViT on the CPU, the paper's ViT-L/16 on a GPU
BENCH = {"cpu": [(None, 32, 64, 1)], "cuda": [(None, 224, 256, 12)]}

RECIPE = register(Recipe("mae", MAEConfig, build_data, build_task, PRESETS, bench=BENCH,
                         help="masked autoencoder ViT pre-training (MAE; long-sequence MAE via --mask_unit)"))
