"""`dit`: class-conditional diffusion with a Diffusion Transformer (Peebles & Xie, arXiv 2212.09748).

Defaults are DiT's (Sec. 4 "Training"): AdamW with a constant lr 1e-4 (min_lr = lr, no warmup), no
weight decay, batch 256, horizontal flips only, EMA of the weights with decay 0.9999, 400K steps
(the ablations' length; DiT-XL/2's headline model trained 7M). Diffusion as in DiT, which follows
improved DDPM (train/diffusion.py): linear betas 1e-4..0.02, T = 1000, epsilon prediction, learned
variance, L_simple + L_vlb; class dropout 0.1 to the null class for classifier-free guidance.

Data: pixel space on small images (`--data shapes`, an ImageFolder, WebDataset shards; scaled to
[-1, 1], in_channels 3), or pre-computed latents (`--data DIR` of .npy / .npz / .pt shards, see
train/data/latents.py; multiplied by `latent_scale`: by default the value the shards record, which `kfe
latents encode` (train/latents.py, a diffusers AutoencoderKL) writes: 0.18215 for SD-VAE, as DiT uses).
`kfe sample dit --vae DIR` decodes the samples to pixels with the same VAE.

`kfe sample dit --ckpt RUN --out grid.png` draws images with classifier-free guidance (train/sample.py).
The `shapes` preset: a 1.3M-parameter DiT (hidden 128, 4 blocks, patch 2) on 16 px shapes, label =
colour, batch 32, 1200 steps; the README says what its samples look like after that CPU run.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

import models
from train import data as data_mod
from train.config import ConfigError, opt
from train.data import DataError, eval_batches, latents as latents_mod
from train.diffusion import GaussianDiffusion
from train.dist import DistInfo, all_reduce_sum
from train.eval import seeded
from train.recipes.base import Data, Recipe, Task, TrainConfig, register

HALF = (0.5, 0.5, 0.5)  # normalise uint8 images to [-1, 1]: the diffusion's data range
FIELDS = ("image", "label")


@dataclass
class DiTConfig(TrainConfig):
    model: str = opt("dit_xl_2", "registered DiT (dit_{s,b,l,xl}_{2,4,8})")
    model_kwargs: dict = opt({}, "create_model overrides, e.g. {\"hidden_size\": 128, \"depth\": 4, \"num_heads\": 4}")
    num_classes: int = opt(0, "class-embedding size (0 = the data's class count)")
    class_dropout: float = opt(0.1, "probability a label is replaced by the null class (CFG); 0 = no CFG")
    learn_sigma: bool = opt(True, "predict the variance too (hybrid loss); false = fixed variance, MSE only")
    diffusion_steps: int = opt(1000, "T, the number of diffusion steps")
    latent_scale: float = opt(0.0, "latents are multiplied by this; 0 = the value the shards record (kfe latents "
                                    "encode writes the VAE's, 0.18215 for SD-VAE), else SD-VAE's 0.18215")
    eval_samples: int = opt(1000, "held-out images for the held-out loss")
    data: str = opt("shapes", "'shapes' | ImageFolder dir | WebDataset shards | latent shards: a DIR of "
                              ".npy/.npz/.pt (N, C, H, W) arrays, or a pattern like 'lat/{00000..00015}.npy'")
    # DiT Sec. 4
    resolution: int = opt(256, "image side in pixels (pixel data; latents set their own size)")
    augment: Literal["auto", "none", "flip", "rrc"] = opt("flip", "pixel data: flip (centre crop + flip, as DiT)")
    batch_size: int = opt(256, "global batch per optimizer step (all ranks x accumulation)")
    steps: int = opt(400_000, "training length in optimizer steps")
    warmup_steps: int = opt(0, "warmup in steps (DiT: none)")
    blr: float = opt(1e-4, "unused while lr > 0")
    lr: float = opt(1e-4, "peak lr (DiT: 1e-4, not scaled with the batch)")
    min_lr: float = opt(1e-4, "lr at the end of the cosine; = lr gives DiT's constant lr")
    weight_decay: float = opt(0.0, "AdamW weight decay (DiT: 0)")
    ema: bool = opt(True, "keep an EMA of the weights (sampling uses it)")
    ema_decay: float = opt(0.9999, "EMA decay per step")
    channels_last: bool = opt(False, "unused (a transformer)")


PRESETS = {
    # A CPU run of a few minutes on 16 px shapes, class = the main object's colour (the attribute a
    # person sees first at this size). Measured here: 32 px with patch 4 at the same cost per step gave
    # patchy, class-blind samples after 600 steps of 64; 16 px with patch 2 (64 tokens of 2x2 pixels),
    # batch 32 and 1200 steps gives objects of the right colour on dark backgrounds. lr 2e-3 and EMA
    # 0.995: DiT's 1e-4 and 0.9999 need ~100x more steps.
    "shapes": {
        "model": "dit_s_2", "model_kwargs": {"hidden_size": 128, "depth": 4, "num_heads": 4},
        "resolution": 16, "augment": "none", "batch_size": 32, "steps": 1200, "lr": 2e-3, "min_lr": 2e-4,
        "warmup_steps": 20, "ema_decay": 0.995, "num_workers": 1, "log_every": 25, "eval_every": 400,
        "ckpt_every": 400, "eval_batch_size": 250, "eval_samples": 500, "shapes": {"label": "color", "val_size": 500},
    },
}


# ---------------------------------------------------------------- data

def _latents(spec: str, what: str, seed: int):
    try:
        return latents_mod.open_latents(spec, seed)
    except latents_mod.LatentError as err:
        raise DataError(f"--{what} {spec!r}: {err}") from None


def build_data(cfg: DiTConfig, info: DistInfo) -> Data:
    if latents_mod.is_latent_spec(cfg.data):
        dataset, base = _latents(cfg.data, "data", cfg.seed)
        train = data_mod.Split(dataset, "latents", len(base), None)
        val = None
        if cfg.val_data:
            vset, vbase = _latents(cfg.val_data, "val_data", cfg.seed)
            if vbase.sample_shape != base.sample_shape:
                raise DataError(f"--val_data latents are {vbase.sample_shape}, --data latents {base.sample_shape}")
            val = data_mod.Split(vset, "latents", len(vbase), None)
        names = [str(i) for i in range(base.num_classes)] if base.labelled else None
        resolve_latent_scale(cfg, base.latent_scale, info.main)
        return Data(train, val, names, FIELDS)
    kind = data_mod.check(cfg.data, "data")
    if cfg.val_data:
        data_mod.check(cfg.val_data, "val_data")
    augment = cfg.augment if cfg.augment != "auto" else ("none" if kind == "shapes" else "flip")
    train = data_mod.open_split(cfg.data, "train", resolution=cfg.resolution, fields=FIELDS, augment=augment,
                                seed=cfg.seed, rank=info.rank, world=info.world, shapes=cfg.shapes,
                                crop_min_scale=cfg.crop_min_scale)
    if train is None:
        raise DataError(f"--data {cfg.data!r} has no training split")
    val = data_mod.open_eval(cfg.val_data or cfg.data, resolution=cfg.resolution, fields=FIELDS, seed=cfg.seed,
                             rank=info.rank, world=info.world, shapes=cfg.shapes, whole=bool(cfg.val_data))
    names = train.class_names or (val.class_names if val else None)
    if names is None and cfg.num_classes <= 0:
        raise DataError(f"{cfg.data!r} does not name its classes (WebDataset): give --num_classes N")
    if val is None and info.main:
        warnings.warn(f"no held-out split for {cfg.data!r} (give --val_data): training without evaluation")
    return Data(train, val, names, FIELDS)


SD_VAE_SCALE = 0.18215


def resolve_latent_scale(cfg: DiTConfig, recorded: float | None, main: bool = True) -> None:
    """cfg.latent_scale := the shards' recorded scale when not given (saved so in config.toml and checkpoints)."""
    if cfg.latent_scale < 0:
        raise ConfigError(f"latent_scale must be >= 0 (0 = from the shards), got {cfg.latent_scale}")
    if cfg.latent_scale == 0:
        cfg.latent_scale = recorded if recorded is not None else SD_VAE_SCALE
        if recorded is None and main:
            warnings.warn(f"the latent shards record no latent_scale: using SD-VAE's {SD_VAE_SCALE} (give "
                          "--latent_scale for another VAE, or write the shards with kfe latents encode)")
    elif recorded is not None and abs(cfg.latent_scale - recorded) > 1e-9 and main:
        warnings.warn(f"--latent_scale {cfg.latent_scale} overrides the {recorded} the shards record")


def geometry(cfg: DiTConfig, data: Data) -> tuple[int, int]:
    """(in_channels, input side) of the model for this data: latents set their own."""
    if data.train.kind == "latents":
        c, h, _ = data.train.dataset.base.sample_shape
        return c, h
    return 3, cfg.resolution


# ---------------------------------------------------------------- model

def build_model(cfg: DiTConfig, in_channels: int, size: int, num_classes: int, device=None):
    if "input_size" in cfg.model_kwargs or "in_channels" in cfg.model_kwargs:
        raise ConfigError("model_kwargs must not set input_size / in_channels: they come from the data "
                          "(--resolution for images, the shards for latents)")
    kw = dict(input_size=size, in_channels=in_channels, num_classes=num_classes,
              class_dropout_prob=cfg.class_dropout, learn_sigma=cfg.learn_sigma, **cfg.model_kwargs)
    with torch.device(device) if device else contextlib.nullcontext():
        return models.create_model(cfg.model, **kw)


def diffusion(cfg: DiTConfig) -> GaussianDiffusion:
    return GaussianDiffusion.linear(cfg.diffusion_steps, cfg.learn_sigma)


def num_classes(cfg: DiTConfig, data: Data) -> int:
    return cfg.num_classes if cfg.num_classes > 0 else len(data.class_names or [0])


def build_task(cfg: DiTConfig, data: Data, info: DistInfo) -> Task:
    channels, size = geometry(cfg, data)
    if size % 2:
        raise ConfigError(f"the model input side must be even, got {size}")
    n_cls = num_classes(cfg, data)
    model = build_model(cfg, channels, size, n_cls)
    meta = build_model(cfg, channels, size, n_cls, "meta")
    x = torch.zeros(1, channels, size, size, device="meta")
    t, y = torch.zeros(1, dtype=torch.long, device="meta"), torch.zeros(1, dtype=torch.long, device="meta")
    macs = models.count_flops(meta, inputs=(x, t, y))
    diff = diffusion(cfg)
    scale = cfg.latent_scale if data.train.kind == "latents" else 1.0

    def loss(net, batch, step):
        x0, y = batch["image"] * scale, batch["label"].clamp_min(0)
        t = torch.randint(0, diff.num_timesteps, (x0.shape[0],), device=x0.device)
        terms = diff.training_losses(lambda xt, tt: net(xt, tt, y), x0, t)
        return terms["loss"].mean(), {"mse": terms["mse"].mean().detach(), "vb": terms["vb"].mean().detach()}

    def evaluate(module, prepare):
        """Held-out L_hybrid, its eps-MSE and VB parts, at fixed (seeded) timesteps and noise."""
        if data.val is None:
            return {}
        dev = info.device
        sums = torch.zeros(4, dtype=torch.float64, device=dev)
        with seeded(dev, cfg.seed + 7919 * (info.rank + 1)):
            for batch in eval_batches(data.val.dataset, cfg.eval_batch_size, info.rank, info.world,
                                      num_workers=min(cfg.num_workers, 2), limit=cfg.eval_samples):
                b = prepare(batch)
                x0, y = b["image"].float() * scale, b["label"].clamp_min(0)
                t = torch.randint(0, diff.num_timesteps, (x0.shape[0],), device=dev)
                terms = diff.training_losses(lambda xt, tt: module(xt, tt, y), x0, t)
                sums += torch.stack([terms["loss"].sum(), terms["mse"].sum(), terms["vb"].sum(),
                                     torch.tensor(float(len(x0)), device=dev)]).double()
        all_reduce_sum(sums, info)
        n = max(float(sums[3]), 1.0)
        return {"loss": float(sums[0]) / n, "mse": float(sums[1]) / n, "vb": float(sums[2]) / n, "n": int(sums[3])}

    return Task(model=model, loss=loss, evaluate=evaluate, flops_per_sample=6.0 * macs, mean=HALF, std=HALF,
                describe=describe)


def describe(m: dict) -> str:
    line = (f"held-out loss {m['loss']:.4f} (eps MSE {m['mse']:.4f} + VB {m['vb']:.4f} bits/dim, "
            f"{m['n']} images)")
    if "ema_loss" in m:
        line += f", EMA {m['ema_loss']:.4f} (MSE {m['ema_mse']:.4f})"
    return line


# kfe bench recipe dit: the shapes preset's DiT on the CPU; on a GPU the paper's DiT-XL/2 on 32 px pixels,
# the token count (256) of DiT's 256 px images as 32x32 latents
BENCH = {"cpu": [(None, 16, 32, 1)], "cuda": [(None, 32, 256, 12)]}

RECIPE = register(Recipe("dit", DiTConfig, build_data, build_task, PRESETS, bench=BENCH,
                         help="diffusion transformer: DDPM with learned variance, CFG (kfe sample dit)"))
