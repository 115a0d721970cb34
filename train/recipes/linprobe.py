"""`linprobe`: MAE's linear-probing protocol on a frozen pre-trained encoder (`--init RUN_OR_CKPT`).

MAE (He et al., arXiv 2111.06377, Appendix A.2 / Table 10, facebookresearch/mae main_linprobe.py and
FINETUNE.md "Linear Probing"): the encoder is frozen; its feature (the cls token after the final norm,
`--cls_token`; a ConvNeXt's pooled, normed feature) goes through BatchNorm without affine parameters
(eps 1e-6) and a linear classifier (trunc-normal std 0.01); LARS, batch 16384, blr 0.1 (lr = blr * batch /
256), weight decay 0, 90 epochs with 10 warmup, cosine to 0; RandomResizedCrop + flip only (no
RandAugment, Mixup, label smoothing or random erasing).

Small batches: LARS moves a weight matrix by at most lr * 1e-3 (the trust coefficient) of its norm per step,
times ~10 with momentum, so the linear scaling rule inherits a step size from the batch: the paper's lr 6.4
(blr 0.1 at batch 16384) over ~7000 steps is what trains the head. At batch 64, blr 0.1 gives lr 0.025, and
50-200 steps move the head's weights by ~1% of their norm: the probe stays at chance whatever the encoder
(measured on `shapes`, colour label: 8.8% / 11.4% top-1 for MAE / random encoders, chance 15.8%). The shapes
preset therefore sets the paper's absolute lr 6.4 (same encoders: 51.0% / 56.6% after 200 steps).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from train.config import opt
from train.dist import DistInfo
from train.optim import lars
from train.recipes import finetune, supervised
from train.recipes.base import Data, Recipe, Task, register


@dataclass
class LinprobeConfig(finetune.FinetuneConfig):
    layer_decay: float = opt(1.0, "unused by linear probing (only the head trains)")
    global_pool: bool = opt(False, "ViT: the cls token (MAE's --cls_token); true: mean of patch tokens")
    batch_size: int = opt(16384, "global batch (MAE: 512 x 32 GPUs)")
    blr: float = opt(0.1, "base lr: lr = blr * batch_size / 256")
    min_lr: float = opt(0.0, "lr at the end of the cosine")
    weight_decay: float = opt(0.0, "LARS weight decay")
    epochs: float = opt(90.0, "training length in epochs (ViT-L/H: 50 suffice, FINETUNE.md)")
    warmup_epochs: float = opt(10.0, "linear warmup length in epochs")
    drop_path: float = opt(0.0, "stochastic depth (off: the encoder is frozen)")
    label_smoothing: float = opt(0.0, "label smoothing")
    mixup: float = opt(0.0, "Mixup alpha")
    cutmix: float = opt(0.0, "CutMix alpha")
    randaug: str = opt("", "timm RandAugment spec ('' = off)")
    reprob: float = opt(0.0, "random erasing probability")


PRESETS = {
    "shapes": {**{k: v for k, v in finetune.PRESETS["shapes"].items() if k not in ("blr", "layer_decay")},
               "batch_size": 256, "lr": 6.4, "min_lr": 0.0, "steps": 200, "warmup_steps": 20},  # lr: see above
}


def probe_head(model: nn.Module) -> nn.Module:
    """Freeze everything, then replace the head by BatchNorm1d(affine=False) + the (re-initialised) Linear."""
    head = model.head
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        nn.init.trunc_normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
    for p in head.parameters():
        p.requires_grad_(True)
    model.head = nn.Sequential(nn.BatchNorm1d(head.in_features, affine=False, eps=1e-6), head)
    return model


def build_task(cfg: LinprobeConfig, data: Data, info: DistInfo) -> Task:
    model = finetune.build_model(cfg, supervised._num_classes(cfg, data))
    finetune.initialise(model, cfg, info)
    probe_head(model)
    task = supervised.build_task(cfg, data, info, model=model)
    task.optimizer = lars
    return task


# `kfe bench recipe linprobe`: (model, resolution, batch, workers) per device (None: the recipe's model)
BENCH = {"cpu": [(None, 32, 64, 1)], "cuda": [(None, 224, 1024, 12)]}

RECIPE = register(Recipe("linprobe", LinprobeConfig, supervised.build_data, build_task, PRESETS, bench=BENCH,
                         help="linear probe of a frozen pre-trained encoder (--init RUN_OR_CKPT): MAE's protocol "
                              "(BatchNorm without affine + linear head, LARS)", resolve=finetune.resolve))
