"""`fcmae`: ConvNeXt V2's fully convolutional masked-autoencoder pre-training (arXiv 2301.00808, Sec. 3.1).

Defaults are the paper's ImageNet-1K pre-training setting (Appendix A.1, Table 11) as the official
main_pretrain.py implements it: AdamW with betas (0.9, 0.95), base lr 1.5e-4 (lr = blr * batch / 256),
weight decay 0.05, batch 4096, 40 warmup epochs then cosine decay to 0, mask ratio 0.6 of 32x32
patches, normalised-pixel loss (the script's default: `set_defaults(norm_pix_loss=True)`, although the
FCMAE class defaults to False), RandomResizedCrop(scale=(0.2, 1), bicubic) + horizontal flip. Length
1600 epochs, the official TRAINING.md command for the released models (the script's default is 800).
The model is `fcmae_convnextv2_<size>` (models/fcmae.py). One difference: the shared trainer exempts
GRN's gamma / beta from weight decay (as ConvNeXt V2 fine-tuning does); the official pre-training
script decays them (timm's add_weight_decay exempts only 1-D tensors and biases; MinkowskiGRN's are 2-D).

Evaluation (self-supervised, so no top-1): the masked-patch loss on held-out images with fixed masks,
and, for labelled data, the k-NN top-1 (train/eval.py: k = 20, T = 0.07) and linear-probe top-1 of the
encoder's pooled features (task.embed = FCMAE.forward_features, the unmasked dense encoder) of
`probe_samples` training images against the held-out split, next to chance. With `init_baseline` the
same numbers for the model at its initialisation are reported once (a copy is kept from step 0).
Evaluations run under torch.random.fork_rng, so they never change the training run's random stream
(masks, drop path): a run with evaluations follows the same loss curve as one without.

The `shapes` preset (picked for --data shapes) is a CPU-sized run: FCMAE needs 32 px patches (the
encoder's total stride), so 96 px images give a 3x3 patch grid (6 of 9 patches removed at ratio 0.6);
at 64 px the 2x2 grid leaves one visible patch of four. ConvNeXt V2 with one block per stage and dims
16..128, a 128-wide decoder, batch 64, 800 steps at blr 6e-3 (1.5e-3 reached loss 0.638 instead of
0.592 in the same steps). Measured (README): held-out masked-patch loss 1.000 -> 0.592, k-NN 12.9% ->
15.1%, linear probe 15.0% -> 16.2% on shape labels (chance 13.8%): the reconstruction is learned, the
pooled features of this tiny, briefly trained encoder barely separate shapes.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass

import torch

import models
from models.fcmae import macs, random_mask
from train import data as data_mod
from train import dist as dist_mod
from train.config import opt
from train.data import DataError, eval_batches
from train.dist import DistInfo
from train.eval import chance as chance_of
from train.eval import features, knn_top1, linear_probe, percent
from train.recipes.base import Data, Recipe, Task, TrainConfig, register


@dataclass
class FCMAEConfig(TrainConfig):
    model: str = opt("fcmae_convnextv2_base", "registered FCMAE model (models.list_models('fcmae_*'))")
    model_kwargs: dict = opt({}, "create_model overrides, e.g. {\"depths\": [1,1,1,1], \"dims\": [16,32,64,128]}")
    mask_ratio: float = opt(0.6, "fraction of 32x32 patches removed per image (L - int(L * (1 - ratio)))")
    norm_pix_loss: bool = opt(True, "per-patch normalised pixel targets (main_pretrain.py's default)")
    decoder_embed_dim: int = opt(512, "decoder width")
    decoder_depth: int = opt(1, "decoder ConvNeXt V2 blocks")
    drop_path: float = opt(0.0, "stochastic depth of the encoder (0 in FCMAE pre-training)")
    probe_samples: int = opt(5000, "training images whose features the k-NN / linear probes use (labelled data; "
                                   "0 = no probes)")
    init_baseline: bool = opt(False, "also evaluate the model at its initialisation (once; a copy is kept)")
    # Table 11 / main_pretrain.py
    resolution: int = opt(224, "image side in pixels (a multiple of the 32 px patch)")
    crop_min_scale: float = opt(0.2, "RandomResizedCrop minimum area fraction")
    epochs: float = opt(1600.0, "training length in epochs (ignored when steps > 0)")
    warmup_epochs: float = opt(40.0, "linear warmup length in epochs")
    blr: float = opt(1.5e-4, "base lr: lr = blr * batch_size / 256")
    min_lr: float = opt(0.0, "lr at the end of the cosine")
    betas: tuple[float, ...] = opt((0.9, 0.95), "AdamW betas")


PRESETS = {
    # A laptop-CPU run on generated shapes (see the module docstring and README for the measured numbers).
    "shapes": {
        "model": "fcmae_convnextv2_atto", "model_kwargs": {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]},
        "decoder_embed_dim": 128, "resolution": 96, "batch_size": 64, "steps": 800, "warmup_steps": 40,
        "blr": 6e-3, "min_lr": 1e-5, "num_workers": 1, "log_every": 25, "eval_every": 400, "ckpt_every": 400,
        "eval_batch_size": 250, "probe_samples": 2000, "init_baseline": True, "shapes": {"val_size": 1000},
    },
}

FIELDS = ("image",)


def build_data(cfg: FCMAEConfig, info: DistInfo) -> Data:
    kind = data_mod.check(cfg.data, "data")
    if cfg.val_data:
        data_mod.check(cfg.val_data, "val_data")
    if cfg.resolution % 32:
        raise DataError(f"resolution must be a multiple of the 32 px FCMAE patch, got {cfg.resolution}")
    augment = cfg.augment if cfg.augment != "auto" else ("none" if kind == "shapes" else "rrc")
    train = data_mod.open_split(cfg.data, "train", resolution=cfg.resolution, fields=FIELDS, augment=augment,
                                seed=cfg.seed, rank=info.rank, world=info.world, shapes=cfg.shapes,
                                crop_min_scale=cfg.crop_min_scale)
    if train is None:
        raise DataError(f"--data {cfg.data!r} has no training split")
    val = data_mod.open_eval(cfg.val_data or cfg.data, resolution=cfg.resolution, fields=FIELDS, seed=cfg.seed,
                             rank=info.rank, world=info.world, shapes=cfg.shapes, whole=bool(cfg.val_data))
    if val is None and info.main:
        warnings.warn(f"no held-out split for {cfg.data!r} (give --val_data): training without evaluation")
    return Data(train, val, train.class_names or (val.class_names if val else None), FIELDS)


def build_model(cfg: FCMAEConfig, device: str | torch.device | None = None):
    kw = dict(mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss, decoder_embed_dim=cfg.decoder_embed_dim,
              decoder_depth=cfg.decoder_depth, drop_path_rate=cfg.drop_path, **cfg.model_kwargs)
    with torch.device(device) if device else contextlib.nullcontext():
        return models.create_model(cfg.model, **kw)


def build_task(cfg: FCMAEConfig, data: Data, info: DistInfo) -> Task:
    model = build_model(cfg)
    initial = copy.deepcopy(model).eval() if cfg.init_baseline else None  # the same weights as step 0
    baseline: dict = {}

    def loss(net, batch, step):
        value, _, _ = net(batch["image"])
        return value, {}

    def embed(module, batch):
        return module.forward_features(batch["image"])

    def held_out_loss(module, prepare) -> float:
        gen = torch.Generator().manual_seed(cfg.seed + 1000 * info.rank)  # the same masks at every evaluation
        total = torch.zeros(2, dtype=torch.float64, device=info.device)
        for batch in eval_batches(data.val.dataset, cfg.eval_batch_size, info.rank, info.world,
                                  limit=cfg.probe_samples or None):  # 0 (no probes): the whole held-out split
            imgs = prepare(batch)["image"]
            mask = random_mask(imgs.shape[0], module.grid(imgs), module.mask_ratio, generator=gen).to(imgs.device)
            value, _, _ = module(imgs, mask=mask)
            total += torch.stack([value.double() * mask.sum(), mask.sum().double()])
        dist_mod.all_reduce_sum(total, info)
        return float(total[0] / total[1].clamp_min(1))

    def probes(module, prepare) -> dict:
        """k-NN and linear-probe top-1 of the pooled features: `probe_samples` training images vs held-out."""
        n_cls = len(data.class_names)
        tr = data_mod.open_eval(cfg.data, resolution=cfg.resolution, fields=FIELDS, seed=cfg.seed, rank=info.rank,
                                world=info.world, shapes=cfg.shapes, split="train")
        kw = dict(batch=cfg.eval_batch_size, rank=info.rank, world=info.world)
        xtr, ytr = features(lambda b: embed(module, b), eval_batches(tr.dataset, limit=cfg.probe_samples, **kw),
                            prepare, info)
        xte, yte = features(lambda b: embed(module, b), eval_batches(data.val.dataset, **kw), prepare, info)
        return {"knn_top1": knn_top1(xtr, ytr, xte, yte, n_cls),
                "linear_top1": linear_probe(xtr, ytr, xte, yte, n_cls, seed=cfg.seed),
                "chance": chance_of(yte, n_cls), "n": int(yte.numel()), "train_n": int(ytr.numel())}

    def measure(module, prepare) -> dict:
        out = {"val_loss": held_out_loss(module, prepare)}
        if data.class_names and cfg.probe_samples > 0:
            out.update(probes(module, prepare))
        return out

    def evaluate(module, prepare):
        if data.val is None:
            return {}
        devices = [info.device] if info.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # evaluation never shifts the training random stream
            out = measure(module, prepare)
            if initial is not None:
                if not baseline:
                    init = measure(initial.to(info.device), prepare)
                    baseline.update({f"init_{k}": init[k] for k in ("val_loss", "knn_top1", "linear_top1") if k in init})
                out.update(baseline)
        return out

    return Task(model=model, loss=loss, evaluate=evaluate, embed=embed,
                flops_per_sample=6.0 * macs(model, cfg.resolution), channels_last=True, describe=describe)


def describe(m: dict) -> str:
    def at_init(key, fmt):
        return f" (init {fmt(m['init_' + key])})" if "init_" + key in m else ""

    line = f"held-out masked-patch loss {m['val_loss']:.4f}{at_init('val_loss', lambda v: f'{v:.4f}')}"
    if "knn_top1" in m:
        line += (f" | k-NN top-1 {percent(m['knn_top1'])}{at_init('knn_top1', percent)}"
                 f" | linear probe {percent(m['linear_top1'])}{at_init('linear_top1', percent)}"
                 f" | chance {percent(m['chance'])} ({m['n']} held-out, {m['train_n']} training images)")
    return line


def export(sd: dict) -> dict:
    """Trained FCMAE weights -> the official checkpoint layout (MinkowskiEngine names; models/fcmae_official)."""
    from models.fcmae_official import to_official
    return to_official(sd)


# kfe bench recipe fcmae: the shapes preset's ConvNeXt V2 on the CPU, the paper's ConvNeXt V2-B on a GPU
BENCH = {"cpu": [(None, 96, 64, 1)], "cuda": [(None, 224, 256, 12)]}

RECIPE = register(Recipe("fcmae", FCMAEConfig, build_data, build_task, PRESETS, export=export, bench=BENCH,
                         help="ConvNeXt V2 FCMAE masked-image pre-training on the sparse encoder"))
