"""`supervised`: image classification with ConvNeXt / ConvNeXt V2 / ViT (and any registered classifier).

Defaults are ConvNeXt's ImageNet-1K recipe (Liu et al., arXiv 2201.03545, Appendix A.1, Table 5):
AdamW, lr 4e-3 at batch 4096 (blr 2.5e-4 with lr = blr * batch / 256), weight decay 0.05, betas
(0.9, 0.999), 300 epochs with 20 warmup and cosine decay, label smoothing 0.1, Mixup 0.8, CutMix 1.0,
RandAugment (9, 0.5) (timm's "rand-m9-mstd0.5-inc1", per sample in the loader), Random Erasing 0.25 (timm's
RandomErasing, per-pixel normal values, on the normalised batch), stochastic depth per model size
(Table 5 / A.1: T 0.1, S 0.4, B 0.5, L 0.5, XL 0.5; `drop_path = -1` picks it), EMA 0.9999.

The `shapes` preset (chosen automatically for --data shapes) is a CPU-sized run: a 0.2M-parameter
ConvNeXt V2 (Atto with one block per stage, dims 16..128) at 32 px, batch 64, 1000 steps, no Mixup/EMA,
evaluated on the held-out split.

A ViT (`--model vit_small_patch16`, ...) is built for `--resolution` (its position embeddings fix the
image size) and classifies from its cls token; its features for `kfe eval --probe knn|linear` are that
token too (as MAE's linear probe). The ConvNeXt hyper-parameters above are not DeiT's: set them.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import models
from train import data as data_mod
from train.config import ConfigError, opt
from train.data import DataError, eval_batches
from train.dist import DistInfo
from train.eval import percent, top1
from train.mixup import MixupCutmix, soft_cross_entropy
from train.recipes.base import Data, Recipe, Task, TrainConfig, register


@dataclass
class SupervisedConfig(TrainConfig):
    model: str = opt("convnext_tiny", "registered model name (models.list_models())")
    model_kwargs: dict = opt({}, "create_model overrides, e.g. {\"depths\": [1,1,1,1], \"dims\": [16,32,64,128]}")
    num_classes: int = opt(0, "classifier outputs (0 = the data's class count)")
    drop_path: float = opt(-1.0, "stochastic depth rate; -1 = the ConvNeXt paper's for the size (T 0.1, S 0.4, "
                                 "B/L/XL 0.5; other models 0.1)")
    randaug: str = opt("rand-m9-mstd0.5-inc1", "timm RandAugment spec ('' = off): 2 ops, magnitude 9, std 0.5")
    reprob: float = opt(0.25, "random erasing probability (timm RandomErasing, pixel mode; 0 = off)")
    head_init_scale: float = opt(1.0, "scale of the classifier's initial weights")
    label_smoothing: float = opt(0.1, "label smoothing")
    mixup: float = opt(0.8, "Mixup alpha (0 = off)")
    cutmix: float = opt(1.0, "CutMix alpha (0 = off)")
    mixup_prob: float = opt(1.0, "probability a batch is mixed")
    mixup_switch_prob: float = opt(0.5, "probability of CutMix instead of Mixup when both are on")
    ema: bool = opt(True, "keep an EMA of the weights (evaluated and checkpointed too)")


PRESETS = {
    # A laptop-CPU run on generated shapes (a couple of minutes): ConvNeXt V2 with one block per stage and
    # dims 16..128 (0.2M parameters) at 32 px. Measured here: the full Atto, and 48-64 px, stayed at
    # chance for the first 300 steps, while this one climbs steadily (see the README's numbers).
    "shapes": {
        "model": "convnextv2_atto", "model_kwargs": {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]},
        "resolution": 32, "batch_size": 64, "steps": 1000, "warmup_steps": 50, "blr": 4e-3, "min_lr": 1e-5,
        "drop_path": 0.0, "mixup": 0.0, "cutmix": 0.0, "ema": False, "num_workers": 1, "log_every": 25,
        "randaug": "", "reprob": 0.0,
        "eval_every": 250, "ckpt_every": 250, "eval_batch_size": 250, "shapes": {"val_size": 1000},
    },
}

FIELDS = ("image", "label")
# ConvNeXt paper, Table 5 / Appendix A.1 (ImageNet-1K training): stochastic depth per model size.
DROP_PATH = {"convnext_tiny": 0.1, "convnext_small": 0.4, "convnext_base": 0.5, "convnext_large": 0.5,
             "convnext_xlarge": 0.5}


def resolve(cfg: SupervisedConfig) -> None:
    """drop_path -1 -> the paper's value for the model (0.1 for models the table does not list)."""
    if cfg.drop_path < 0:
        cfg.drop_path = DROP_PATH.get(cfg.model, 0.1)
    if not 0.0 <= cfg.reprob <= 1.0:
        raise ConfigError(f"reprob must be in [0, 1], got {cfg.reprob}")


def build_data(cfg: SupervisedConfig, info: DistInfo) -> Data:
    kind = data_mod.check(cfg.data, "data")
    if cfg.val_data:
        data_mod.check(cfg.val_data, "val_data")
    augment = cfg.augment if cfg.augment != "auto" else ("none" if kind == "shapes" else "rrc")
    train = data_mod.open_split(cfg.data, "train", resolution=cfg.resolution, fields=FIELDS, augment=augment,
                                seed=cfg.seed, rank=info.rank, world=info.world, shapes=cfg.shapes,
                                crop_min_scale=cfg.crop_min_scale, randaug=cfg.randaug)
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


def _num_classes(cfg: SupervisedConfig, data: Data) -> int:
    return cfg.num_classes if cfg.num_classes > 0 else len(data.class_names)


def _size_kw(cfg: SupervisedConfig) -> dict:
    """{"img_size": resolution} for models built for one image size (ViTs: their position embeddings);
    ConvNeXts take any size and no such argument."""
    if "img_size" in cfg.model_kwargs:
        raise ConfigError("model_kwargs must not set img_size: use --resolution")
    with torch.device("meta"):  # a free build, to see the model's class
        cls = type(models.create_model(cfg.model, **cfg.model_kwargs))
    return {"img_size": cfg.resolution} if "img_size" in inspect.signature(cls.__init__).parameters else {}


def build_model(cfg: SupervisedConfig, num_classes: int, device: str | torch.device | None = None):
    if cfg.drop_path < 0:
        resolve(cfg)
    kw = dict(num_classes=num_classes, drop_path_rate=cfg.drop_path, **_size_kw(cfg), **cfg.model_kwargs)
    if cfg.head_init_scale != 1.0:
        kw["head_init_scale"] = cfg.head_init_scale
    with torch.device(device) if device else contextlib.nullcontext():
        return models.create_model(cfg.model, **kw)


def build_task(cfg: SupervisedConfig, data: Data, info: DistInfo, model: torch.nn.Module | None = None) -> Task:
    """The classification task; `model` replaces the one built from cfg (fine-tuning / linear probing)."""
    n_cls = _num_classes(cfg, data)
    model = build_model(cfg, n_cls) if model is None else model
    macs = models.count_flops(build_model(cfg, n_cls, "meta"), (1, 3, cfg.resolution, cfg.resolution))
    mix = MixupCutmix(n_cls, cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob, cfg.label_smoothing)
    erase = random_erasing(cfg.reprob)

    def loss(net, batch, step):
        x, y = batch["image"], batch["label"]
        if erase is not None:
            x = erase(x)
        if mix.active:
            x, target = mix(x, y)
            return soft_cross_entropy(net(x), target), {}
        return F.cross_entropy(net(x).float(), y, label_smoothing=cfg.label_smoothing), {}

    def evaluate(module, prepare):
        if data.val is None:
            return {}
        batches = eval_batches(data.val.dataset, cfg.eval_batch_size, info.rank, info.world,
                               num_workers=min(cfg.num_workers, 2))
        return top1(lambda b: module(b["image"]), batches, prepare, info, n_cls)

    def embed(module, batch):
        feats = module.forward_features(batch["image"])
        # A ViT returns its tokens (N, 1 + L, D): take the cls token, which its classifier reads too
        return feats[:, 0] if feats.dim() == 3 else feats

    return Task(model=model, loss=loss, evaluate=evaluate, embed=embed, flops_per_sample=6.0 * macs,
                channels_last=True, describe=describe)


def random_erasing(prob: float):
    """timm's RandomErasing (DeiT / ConvNeXt / MAE: pixel mode, one box, per sample) on a normalised batch,
    or None when prob is 0. It draws from Python's `random` and torch's generator, both checkpointed."""
    if prob <= 0:
        return None
    from timm.data.random_erasing import RandomErasing

    ops: dict = {}

    def apply(x: torch.Tensor) -> torch.Tensor:
        if x.device not in ops:
            ops[x.device] = RandomErasing(probability=prob, mode="pixel", device=x.device)
        return ops[x.device](x.clone())

    return apply


def describe(m: dict) -> str:
    line = f"held-out top-1 {percent(m['top1'])} (chance {percent(m['chance'])}, {m['n']} images)"
    if "ema_top1" in m:
        line += f", EMA top-1 {percent(m['ema_top1'])}"
    return line


BENCH = {  # kfe bench recipe supervised: (model, resolution, global batch, loader workers)
    "cpu": [("convnextv2_atto", 64, 32, 2)],
    "cuda": [("convnextv2_atto", 224, 256, 12), ("convnext_tiny", 224, 128, 12)],
}

RECIPE = register(Recipe("supervised", SupervisedConfig, build_data, build_task, PRESETS, bench=BENCH,
                         help="image classification: ConvNeXt / ConvNeXt V2 / ViT (ConvNeXt's ImageNet recipe)",
                         resolve=resolve))
