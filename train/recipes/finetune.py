"""`finetune`: end-to-end fine-tuning of a pre-trained encoder for classification (`--init RUN_OR_CKPT`).

    kfe train mae --data shapes --out runs/mae-shapes
    kfe train finetune --data shapes --init runs/mae-shapes --model vit_small_patch16 ...
    kfe train finetune --data /data/imagenet --preset mae_vit_large --init mae_pretrain_vit_large.pth

`--init` takes a KFE run or checkpoint (mae, fcmae, maskfeat, ...), a `kfe export` file, or an official
checkpoint (MAE .pth, ConvNeXt V2 FCMAE .pt, MaskFeat SlowFast .pyth); see train/init_weights.py for the
key mapping and its report (dropped: decoder, mask token; new: head, fc_norm). `--init ''` trains the same
model from random initialisation (the baseline pre-training is compared with).

Defaults are MAE's ViT-B fine-tuning (He et al., arXiv 2111.06377, Table 9 / facebookresearch/mae
FINETUNE.md): batch 1024, blr 5e-4, layer-wise lr decay 0.65 (train/lr_decay.py), weight decay 0.05,
AdamW (0.9, 0.999), 100 epochs with 5 warmup, drop path 0.1, RandAugment (9, 0.5), label smoothing 0.1,
Mixup 0.8, CutMix 1.0, random erasing 0.25, global average pooling + fc_norm, head initialised with
std 2e-5. Presets cite their sources next to them.

Not a preset: long-sequence MAE (Hu et al., arXiv 2210.07224). facebookresearch/long_seq_mae publishes
checkpoints (448 px, L = 784; they load through --init, position table resized) and detection fine-tuning
(FINETUNE_DETECTION.md, ViTDet); its FINETUNE.md and main_finetune.py are MAE's unchanged, and the paper's
ImageNet-1K fine-tuning settings (its appendix) were not readable where this was written: no batch, lr,
layer decay, drop path or epochs for a long-sequence classification run are transcribed here. The MAE
presets are the documented fallback ("README_MAE.md ... such as fine-tuning on image classification"). A ViT is built with a learned position table (MAE's
fine-tuning ViT is timm's), initialised from the checkpoint's (resized if the resolution differs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

import models
from train.config import ConfigError, opt
from train.dist import DistInfo
from train.init_weights import load_init
from train.lr_decay import VIT_NO_WEIGHT_DECAY, param_groups_lrd
from train.recipes import supervised
from train.recipes.base import Data, Recipe, Task, register


@dataclass
class FinetuneConfig(supervised.SupervisedConfig):
    init: str = opt("", "pre-trained weights: a KFE run dir / checkpoint / export or an official checkpoint "
                        "('' = random init, the baseline)")
    layer_decay: float = opt(0.65, "layer-wise lr decay (1 = off): lr of layer i = lr * decay^(L - i)")
    layer_decay_type: Literal["auto", "single", "group"] = opt(
        "auto", "ConvNeXt ids: single (one per block) or group (3 blocks per id); auto: group for >= 36 blocks "
                "(B/L/H; the paper decays H per block: its preset says single)")
    global_pool: bool = opt(True, "ViT: mean of patch tokens + fc_norm (MAE); false: the cls token")
    decay_pos_cls: bool = opt(False, "weight-decay a ViT's pos_embed / cls_token too (SlowFast's "
                                     "ZERO_DECAY_POS_CLS: False); MAE exempts them")
    # MAE ViT-B (FINETUNE.md: 32 x 4 nodes x 8 GPUs = 1024, blr 5e-4, 100 epochs; main_finetune.py defaults)
    model: str = opt("vit_base_patch16", "registered model name (models.list_models())")
    batch_size: int = opt(1024, "global batch per optimizer step")
    blr: float = opt(5e-4, "base lr: lr = blr * batch_size / 256")
    epochs: float = opt(100.0, "training length in epochs (ignored when steps > 0)")
    warmup_epochs: float = opt(5.0, "linear warmup length in epochs")
    drop_path: float = opt(0.1, "stochastic depth rate")
    ema: bool = opt(False, "keep an EMA of the weights")


PRESETS = {
    # MAE, facebookresearch/mae FINETUNE.md (paper Table 9): ViT-L / ViT-H 50 epochs, blr 1e-3, decay 0.75.
    "mae_vit_large": {"model": "vit_large_patch16", "blr": 1e-3, "layer_decay": 0.75, "drop_path": 0.2,
                      "epochs": 50.0},
    "mae_vit_huge": {"model": "vit_huge_patch14", "blr": 1e-3, "layer_decay": 0.75, "drop_path": 0.3,
                     "epochs": 50.0},
    # MaskFeat, facebookresearch/SlowFast configs/masked_ssl/in1k_VIT_{B,L}_MaskFeat_FT.yaml (the fine-tune
    # configs projects/maskfeat/README.md lists; NUM_SHARDS 1, so BASE_LR is the lr at TRAIN.BATCH_SIZE):
    # B: batch 512, lr 2e-3, decay 0.65, 100 epochs (20 warmup); L: batch 256, lr 1e-3, decay 0.75, 50 epochs
    # (5 warmup). Both: AdamW wd 0.05 with pos_embed / cls_token decayed too (ZERO_DECAY_POS_CLS False; 1-D
    # and biases not), cosine to 1e-6, drop path 0.1, mean pooling, head init scale 1e-3, RandAugment
    # rand-m9-mstd0.5-inc1, random erasing 0.25, Mixup 0.8 / CutMix 1.0, label smoothing 0.1.
    # (Their colour jitter 0.4 is not applied here.)
    "maskfeat_vit_base": {"model": "vit_base_patch16", "batch_size": 512, "lr": 2e-3, "layer_decay": 0.65,
                          "epochs": 100.0, "warmup_epochs": 20.0, "drop_path": 0.1, "head_init_scale": 1e-3,
                          "decay_pos_cls": True},
    "maskfeat_vit_large": {"model": "vit_large_patch16", "batch_size": 256, "lr": 1e-3, "layer_decay": 0.75,
                           "epochs": 50.0, "warmup_epochs": 5.0, "drop_path": 0.1, "head_init_scale": 1e-3,
                           "decay_pos_cls": True},
    # ConvNeXt V2 (Woo et al., arXiv 2301.00808, Appendix A.2, Tables 9-11; facebookresearch/ConvNeXt-V2
    # TRAINING.md for A / T / B, whose commands agree with the tables except B's base lr, see below). All
    # sizes: AdamW (0.9, 0.999), batch 1024, cosine, RandAug (9, 0.5), head init 0.001, EMA 0.9999; random
    # erasing 0.25 and min lr 1e-6 are main_finetune.py's defaults (the tables do not list them). Layer decay
    # "single" (one id per block) except Base / Large, "group" (A.2: "we apply the group-wise decaying
    # strategy to Base and Large models"; main_finetune.py: 'group' "applies for Base and Large models").
    # Table 9 (Atto / Femto / Pico / Nano): blr 2e-4, 600 epochs, no warmup, decay 0.9, label smoothing 0.2;
    # weight decay 0.05 (F), 0.3 (A/P/N); mixup = cutmix 0.0 (A), 0.3 (F/P), 0.5 (N); drop path 0.1 (A/N),
    # 0.0 (F/P). TRAINING.md's Atto command gives the same values.
    **{f"convnextv2_{size}": {
        "model": f"convnextv2_{size}", "blr": 2e-4, "epochs": 600.0, "warmup_epochs": 0.0,
        "layer_decay_type": "single", "layer_decay": 0.9, "weight_decay": wd, "drop_path": dp, "mixup": mix,
        "cutmix": mix, "label_smoothing": 0.2, "ema": True, "head_init_scale": 1e-3}
       for size, wd, mix, dp in (("atto", 0.3, 0.0, 0.1), ("femto", 0.05, 0.3, 0.0), ("pico", 0.3, 0.3, 0.0),
                                 ("nano", 0.3, 0.5, 0.1))},
    # Table 10 (Tiny) = TRAINING.md's Tiny command: blr 8e-4, 300 epochs, 40 warmup, decay 0.9, drop path 0.2.
    "convnextv2_tiny": {"model": "convnextv2_tiny", "blr": 8e-4, "epochs": 300.0, "warmup_epochs": 40.0,
                        "layer_decay_type": "single", "layer_decay": 0.9, "drop_path": 0.2, "ema": True,
                        "head_init_scale": 1e-3},
    # Table 11 (Base / Large / Huge): decay 0.6 (B/L), 0.75 (H); warmup 20 (B/L), 10 (H); 100 (B/L), 50 (H)
    # epochs; drop path 0.1 (B), 0.2 (L), 0.3 (H); base lr "6.25e-3 (B/L), 1.25e-3 (H)". The official Base
    # command (TRAINING.md) uses --blr 6.25e-4, ten times less than the table's B/L entry (6.25e-3 would be an
    # AdamW lr of 0.025 at batch 1024): Base and Large take the command's 6.25e-4, the one value published
    # for a run; Huge takes the table's 1.25e-3 (no command is published for it).
    "convnextv2_base": {"model": "convnextv2_base", "blr": 6.25e-4, "epochs": 100.0, "warmup_epochs": 20.0,
                        "layer_decay_type": "group", "layer_decay": 0.6, "drop_path": 0.1, "ema": True,
                        "head_init_scale": 1e-3},
    "convnextv2_large": {"model": "convnextv2_large", "blr": 6.25e-4, "epochs": 100.0, "warmup_epochs": 20.0,
                         "layer_decay_type": "group", "layer_decay": 0.6, "drop_path": 0.2, "ema": True,
                         "head_init_scale": 1e-3},
    "convnextv2_huge": {"model": "convnextv2_huge", "blr": 1.25e-3, "epochs": 50.0, "warmup_epochs": 10.0,
                        "layer_decay_type": "single", "layer_decay": 0.75, "drop_path": 0.3, "ema": True,
                        "head_init_scale": 1e-3},
    # CPU-sized: the encoder of mae's shapes preset (4 blocks, dim 96, 4 px patches, 32 px); see
    # benchmarks/results/finetune-shapes.md. Other encoders: --model / --model_kwargs / --resolution.
    "shapes": {
        "model": "vit_small_patch16", "model_kwargs": {"patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3},
        "resolution": 32, "batch_size": 64, "steps": 200, "warmup_steps": 20, "blr": 8e-3, "min_lr": 1e-5,
        "drop_path": 0.0, "mixup": 0.0, "cutmix": 0.0, "randaug": "", "reprob": 0.0, "ema": False,
        "layer_decay": 0.75, "num_workers": 0, "log_every": 25, "eval_every": 100, "ckpt_every": 200,
        "eval_batch_size": 250, "shapes": {"val_size": 1000},
    },
}


def is_vit(model_name: str, model_kwargs: dict) -> bool:
    with torch.device("meta"):
        m = models.create_model(model_name, **model_kwargs)
    return hasattr(m, "patch_embed") and hasattr(m, "blocks")


def build_model(cfg: FinetuneConfig, num_classes: int) -> nn.Module:
    kw = dict(num_classes=num_classes, drop_path_rate=cfg.drop_path, **cfg.model_kwargs)
    if "img_size" in kw:
        raise ConfigError("model_kwargs must not set img_size: use --resolution")
    vit = is_vit(cfg.model, cfg.model_kwargs)
    if vit:
        kw.update(img_size=cfg.resolution, global_pool=cfg.global_pool, pos_embed="learned")
    elif cfg.head_init_scale != 1.0:
        kw["head_init_scale"] = cfg.head_init_scale
    model = models.create_model(cfg.model, **kw)
    if vit:  # MAE: trunc_normal(std 2e-5) head after loading; SlowFast's HEAD_INIT_SCALE scales it
        with torch.no_grad():
            nn.init.trunc_normal_(model.head.weight, std=2e-5 if cfg.head_init_scale == 1.0 else 0.02)
            if cfg.head_init_scale != 1.0:
                model.head.weight.mul_(cfg.head_init_scale)
            nn.init.zeros_(model.head.bias)
    return model


def initialise(model: nn.Module, cfg, info: DistInfo) -> None:
    if cfg.init:
        try:
            report = load_init(model, cfg.init)
        except (FileNotFoundError, ValueError) as err:  # (UnsafeCheckpointError too) -> `kfe train`'s one line
            raise ConfigError(str(err)) from None
        if info.main:
            print(report.line(), flush=True)


def build_task(cfg: FinetuneConfig, data: Data, info: DistInfo) -> Task:
    model = build_model(cfg, supervised._num_classes(cfg, data))
    initialise(model, cfg, info)
    task = supervised.build_task(cfg, data, info, model=model)
    if cfg.layer_decay != 1.0:
        no_wd = () if cfg.decay_pos_cls else VIT_NO_WEIGHT_DECAY
        task.param_groups = lambda m: param_groups_lrd(m, cfg.weight_decay, cfg.layer_decay, cfg.layer_decay_type,
                                                       no_weight_decay=no_wd)
    return task


def resolve(cfg: FinetuneConfig) -> None:
    supervised.resolve(cfg)
    if not 0.0 < cfg.layer_decay <= 1.0:
        raise ConfigError(f"layer_decay must be in (0, 1], got {cfg.layer_decay}")


# `kfe bench recipe finetune`: (model, resolution, batch, workers) per device (None: the recipe's model)
BENCH = {"cpu": [(None, 32, 64, 1)], "cuda": [(None, 224, 256, 12)]}

RECIPE = register(Recipe("finetune", FinetuneConfig, supervised.build_data, build_task, PRESETS, bench=BENCH,
                         help="fine-tune a pre-trained encoder (--init RUN_OR_CKPT): MAE / MaskFeat / ConvNeXt V2 "
                              "recipes with layer-wise lr decay", resolve=resolve))
