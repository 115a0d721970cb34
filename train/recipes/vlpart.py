"""`vlpart`: open-vocabulary object and part segmentation (Sun et al., "Going Denser with Open-Vocabulary
Part Segmentation", arXiv 2305.11173), a lean version on torchvision's detection parts (models/vlpart).

Data: `--data shapes-parts` (built in, train/data/shapes_parts.py; held out: its val split) or a COCO JSON
file (images under --image_root; --val_data another COCO JSON). Mixed annotation levels in one run:
images with masks train every head, images with only "pos_category_ids" train the classifier through
Detic's max-size loss. `--parsed FILE.json[,FILE2.json]` adds part annotations made by `kfe vlpart parse`.
The training vocabulary is the categories that have annotations in the training data; evaluation uses
every category name of the held-out data (`--rename cat=feline,...` swaps words in them: open vocabulary).

Defaults follow VLPart's R50 Pascal Part setting where they carry over (sigmoid CE, class-agnostic box
and mask heads, temperature 50 learned here, image-level loss weight 0.1 as Detic); the backbone is a
KFE ConvNeXt V2 (GRN on the engine) with an FPN instead of the paper's ResNet-50 / Swin. The
`shapes-parts` preset (picked automatically for --data shapes-parts) is a CPU-sized run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

import models
from train.config import opt
from train.data import DataError, Split, Transformed
from train.data.transforms import make_transform
from train.dist import DistInfo, all_gather_objects, broadcast_object
from train.recipes.base import Data, Recipe, Task, TrainConfig, register
from train.vlpart import evaluate as ev
from train.vlpart import text as text_mod
from train.vlpart.data import SHAPES_PARTS, open_parts


@dataclass
class VLPartConfig(TrainConfig):
    data: str = opt(SHAPES_PARTS, "'shapes-parts' or a COCO JSON annotation file")
    image_root: str = opt("", "image folder of --data (default: beside the JSON, or its images/)")
    val_image_root: str = opt("", "image folder of --val_data")
    parsed: str = opt("", "extra part annotations (COCO JSON from `kfe vlpart parse`), comma-separated")
    text: str = opt("", "text-embedding file (default: the committed MiniLM embeddings, train/vlpart/)")
    rename: str = opt("", "evaluation vocabulary rewrites 'old=new,...' (e.g. cat=feline)")
    train_size: int = opt(2000, "shapes-parts: training images")
    val_size: int = opt(200, "shapes-parts: held-out images")
    data_seed: int = opt(0, "shapes-parts: dataset seed (fixed across training seeds)")
    image_level: float = opt(0.0, "shapes-parts: fraction of training images with image-level labels only")
    image_loss_weight: float = opt(0.1, "weight of Detic's max-size image-label loss")
    model: str = opt("convnextv2_atto", "KFE ConvNeXt / ConvNeXt V2 backbone (models.list_models())")
    model_kwargs: dict = opt({}, "create_model overrides, e.g. {\"depths\": [1,1,1,1], \"dims\": [16,32,64,128]}")
    fpn_channels: int = opt(256, "FPN width")
    rep_size: int = opt(1024, "box head MLP width")
    mask_layers: list[int] = opt([256, 256, 256, 256], "mask head conv widths")
    roi_batch: int = opt(512, "RoIs sampled per image for the box head")
    rpn_post_nms: int = opt(1000, "RPN proposals kept per image in training")
    resolution: int = opt(640, "images are resized to resolution x resolution")
    batch_size: int = opt(16, "global batch")
    epochs: float = opt(12.0, "1x schedule")
    warmup_epochs: float = opt(0.5, "linear warmup")
    blr: float = opt(1e-4 * 256 / 16, "AdamW base lr (lr = blr * batch / 256)")
    weight_decay: float = opt(1e-4, "AdamW weight decay")
    clip_grad: float = opt(10.0, "max global grad norm")
    channels_last: bool = opt(False, "RoI ops read NCHW")
    eval_batch_size: int = opt(16, "per-rank batch for evaluation")
    augment: Literal["auto", "none"] = opt("none", "images are used as they are (boxes would need the same flip)")


PRESETS = {
    SHAPES_PARTS: {
        "model_kwargs": {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}, "fpn_channels": 32,
        "rep_size": 128, "mask_layers": [32, 32], "roi_batch": 32, "rpn_post_nms": 200, "resolution": 96,
        "batch_size": 8, "threads": 1,
        "steps": 300, "warmup_steps": 30, "lr": 2e-3, "min_lr": 1e-5, "weight_decay": 0.05, "num_workers": 0,
        "log_every": 25, "ckpt_every": 100, "eval_batch_size": 32, "train_size": 2000, "val_size": 200,
        "image_level": 0.1,
    },
}


def _vocab(cats: list[dict], rename: str) -> list[str]:
    names = [c["name"] for c in cats]
    for pair in filter(None, (p.strip() for p in rename.split(","))):
        if "=" not in pair:
            raise ValueError(f"--rename takes 'old=new,...', got {pair!r}")
        old, new = (s.strip() for s in pair.split("=", 1))
        names = [":".join(new if w == old else w for w in n.split(":")) for n in names]
    return names


def build_data(cfg: VLPartConfig, info: DistInfo) -> Data:
    extra = [p for p in cfg.parsed.split(",") if p.strip()]
    for path in ([cfg.data] if cfg.data != SHAPES_PARTS else []) + extra + ([cfg.val_data] if cfg.val_data else []):
        if not os.path.isfile(path):
            raise DataError(f"no such annotation file {path!r} (give 'shapes-parts' or COCO JSON)")
    try:
        train = open_parts(cfg.data, "train", cfg.resolution, seed=cfg.data_seed, size=cfg.train_size,
                           image_root=cfg.image_root, extra=extra, image_level=cfg.image_level)
        val_spec = cfg.val_data or (SHAPES_PARTS if cfg.data == SHAPES_PARTS else "")
        val = (open_parts(val_spec, "val", cfg.resolution, seed=cfg.data_seed, size=cfg.val_size,
                          image_root=cfg.val_image_root)
               if val_spec else None)
    except (FileNotFoundError, ValueError) as err:
        raise DataError(str(err)) from None
    if info.main and (train.skipped or (val and val.skipped)):
        print(f"vlpart data: skipped bad annotations: train {dict(train.skipped)}"
              + (f", val {dict(val.skipped)}" if val else ""), flush=True)
    wrap = make_transform(cfg.resolution, "none")
    return Data(Split(Transformed(train, wrap, cfg.seed), "parts", len(train), train.names),
                Split(val, "parts", len(val), val.names) if val else None, train.names, ("image",))


def build_model(cfg: VLPartConfig, embed_dim: int):
    from models.vlpart import VLPart

    backbone = models.create_model(cfg.model, num_classes=0, **cfg.model_kwargs)
    return VLPart(backbone, embed_dim, fpn_channels=cfg.fpn_channels, rep_size=cfg.rep_size,
                  mask_layers=tuple(cfg.mask_layers), roi_batch=cfg.roi_batch,
                  rpn_post_nms=cfg.rpn_post_nms)


def build_task(cfg: VLPartConfig, data: Data, info: DistInfo) -> Task:
    train = data.train.dataset.base
    # training vocabulary: the categories with annotations (boxes or image labels) in the training data
    used = sorted({train.cat_index[a["category_id"]] for r in train.records for a in r["anns"]}
                  | {c for r in train.records for c in r["image_labels"]})
    if not used:
        raise DataError(f"{cfg.data!r} has no usable annotation")
    text_all = text_mod.embed(train.names, cfg.text)
    to_train = torch.zeros(len(train.names) + 1, dtype=torch.long)
    to_train[torch.tensor(used) + 1] = torch.arange(1, len(used) + 1)
    model = build_model(cfg, text_all.shape[1])
    text_train = text_all[used]

    def loss(net, batch, step):
        x = batch["image"]
        targets = []
        for i in batch["index"].tolist():
            t = train.targets(i)
            if "labels" in t:
                t = {"boxes": t["boxes"].to(x.device), "labels": to_train[t["labels"]].to(x.device),
                     "masks": t["masks"].to(x.device)}
            else:
                t = {"image_labels": [int(to_train[c + 1]) - 1 for c in t["image_labels"]]}
            targets.append(t)
        losses = net(x, text_train.to(x.device), targets)
        total = sum(v * (cfg.image_loss_weight if k == "loss_image" else 1.0) for k, v in losses.items())
        return total, {k: v.detach() for k, v in losses.items()}

    def evaluate(module, prepare, names: list[str] | None = None):
        val = data.val.dataset if data.val else None
        if val is None:
            return {}
        vocab = names or _vocab(val.categories, cfg.rename)
        text = text_mod.embed(vocab, cfg.text)
        mine = list(range(info.rank, len(val), info.world))
        was = module.training
        module.eval()
        dets = ev.predictions(module, val, mine, text, prepare, cfg.eval_batch_size)
        module.train(was)
        parts = all_gather_objects((ev.ground_truth(val, mine), dets), info)
        metrics = None
        if info.main:
            gt = {"images": [], "annotations": [], "categories": parts[0][0]["categories"]}
            all_dets = []
            for g, d in parts:
                gt["images"] += g["images"]
                gt["annotations"] += g["annotations"]
                all_dets += d
            for k, a in enumerate(gt["annotations"]):
                a["id"] = k + 1
            metrics = ev.coco_metrics(gt, all_dets, val.categories)
            metrics["skipped_annotations"] = sum(val.skipped.values())
            run_dir = cfg.out or os.path.join("runs", f"vlpart-{os.path.basename(cfg.data)}")
            if os.path.isdir(run_dir):
                ev.write_json(metrics, os.path.join(run_dir, "eval.json"))
        return broadcast_object(metrics, info)

    task = Task(model=model, loss=loss, evaluate=evaluate, channels_last=False, describe=ev.describe,
                flops_per_sample=training_flops(model, train, cfg, text_train, to_train))
    task.text_train, task.used = text_train, used  # for tests and tools
    return task


def training_flops(model, train, cfg: VLPartConfig, text: torch.Tensor, to_train: torch.Tensor,
                   n: int = 2) -> float | None:
    """Training FLOPs per image (fwd + bwd = 3x the forward, as the other recipes' 6 x MACs), counted by
    torch.utils.flop_counter on a training forward of the first `n` box-annotated training images: a
    detector's cost depends on its proposals and sampled RoIs, so it is measured, not derived. RoIAlign
    and NMS are not matmuls and are not counted. The global RNG is restored (proposal sampling draws
    from it), so counting does not change the training run."""
    from torch.utils.flop_counter import FlopCounterMode

    from train.data.transforms import normalize

    idx = [i for i in range(len(train)) if "labels" in train.targets(i)][:n]
    if not idx:
        return None
    x = torch.stack([torch.from_numpy(np.array(train[i]["image"])).permute(2, 0, 1) for i in idx])
    x = normalize(x, torch.device("cpu"))
    targets = []
    for i in idx:
        t = train.targets(i)
        targets.append({"boxes": t["boxes"], "labels": to_train[t["labels"]], "masks": t["masks"]})
    with torch.random.fork_rng(devices=[]), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.train()
        model(x, text, targets)
    return 3.0 * counter.get_total_flops() / len(idx)


# `kfe bench recipe vlpart`: (model, resolution, batch, workers) per device (None: the recipe's model)
BENCH = {"cpu": [(None, 64, 8, 1)], "cuda": [(None, 640, 16, 8)], "data": "shapes-parts"}

RECIPE = register(Recipe("vlpart", VLPartConfig, build_data, build_task, PRESETS, bench=BENCH,
                         help="open-vocabulary object + part segmentation (VLPart): Mask R-CNN parts, text classifier"))
