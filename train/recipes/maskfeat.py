"""`maskfeat`: MaskFeat pre-training (Wei et al., arXiv 2112.09133) of a ViT on images or video clips.

The model (models/maskfeat.py) replaces block-wise masked tokens (40%) by a mask token and regresses
the HOG of every masked 16x16 patch (engine.ops.hog_targets, masked tokens only) with an MSE loss.

Defaults are MaskFeat's ImageNet-1K ViT-B pre-training setting (the paper's appendix table, as set by
the official facebookresearch/SlowFast configs/masked_ssl/in1k_VIT_B_MaskFeat_PT.yaml): AdamW, base lr
2e-4 per 256 images (lr = blr * batch / 256 = 1.6e-3 at batch 2048), weight decay 0.05 (none on 1-D
parameters), betas (0.9, 0.999), batch 2048, 30 warmup epochs then cosine to 1e-6, 1600 epochs (the
paper's ViT-B result; the released config runs 300), gradient clipping at norm 0.02, mask ratio 0.4,
RandomResizedCrop with scale (0.5, 1) + flip, no drop path. Not reproduced: the config's precise-BN
pass (there is no BatchNorm in a ViT).

Video (`--num_frames T`, T > 1): clips (B, 3, T, H, W) of moving shapes (`--data shapes`) or from a
folder of frame directories (train/data/clips.py), 2x16x16 space-time tokens, cube masks (or
`--video_mask tube`), the first frame of each cube as HOG target. MaskFeat's Kinetics settings
(16 x 4 clips, MViT) are not the defaults here: set --num_frames 16 --frame_stride 4 for them.

Masks are drawn per micro-batch from a torch.Generator seeded by (seed, rank, step, micro-batch), so a
resumed run draws the same masks. Evaluation (`eval_every`, the end, and `kfe eval RUN`): the held-out
MaskFeat loss under fixed masks, and a k-NN and a linear probe on the encoder's mean-pooled features
(train/eval.py) of `probe_samples` training images, against the held-out labels, with chance printed.

The `shapes` preset (auto for --data shapes) is a CPU-sized run; `shapes_video` is its video twin
(select it with --preset shapes_video).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

import models
from train import data as data_mod
from train import dist as dist_mod
from train.config import opt
from train.data import DataError, Split, eval_batches
from train.data.clips import FrameFolder, MovingShapes, make_clip_transform
from train.data.loader import Transformed
from train.dist import DistInfo
from train.eval import chance, features, knn_top1, linear_probe, percent
from train.recipes.base import Data, Recipe, Task, TrainConfig, register


@dataclass
class MaskFeatConfig(TrainConfig):
    model: str = opt("maskfeat_vit_base", "maskfeat_vit_{small,base,large,huge}")
    model_kwargs: dict = opt({}, "create_model overrides, e.g. {\"embed_dim\": 192, \"depth\": 6, \"num_heads\": 3}")
    mask_ratio: float = opt(0.4, "fraction of tokens masked (block-wise; cubes for video)")
    drop_path: float = opt(0.0, "stochastic depth rate")
    num_frames: int = opt(1, "1 = images; T > 1 = clips of T frames (2x16x16 tokens): --data shapes -> moving "
                               "shapes, a directory -> [<class>/]<clip>/<frame images> folders")
    frame_stride: int = opt(4, "video from a frame folder: take every k-th frame (SlowFast's 16 x 4)")
    video_mask: Literal["cube", "tube"] = opt("cube", "video masks: space-time cubes (MaskFeat) or tubes")
    probe: Literal["both", "knn", "linear", "none"] = opt("both", "probes of the held-out evaluation")
    probe_samples: int = opt(10_000, "training samples whose features the k-NN / linear probe use (0 = no probes)")
    probe_epochs: int = opt(100, "linear-probe epochs over those features")
    # MaskFeat's ImageNet pre-training (see the module docstring)
    batch_size: int = opt(2048, "global batch per optimizer step (all ranks x accumulation)")
    epochs: float = opt(1600.0, "training length in epochs (ignored when steps > 0)")
    warmup_epochs: float = opt(30.0, "linear warmup length in epochs")
    blr: float = opt(2e-4, "base lr: lr = blr * batch_size / 256")
    min_lr: float = opt(1e-6, "lr at the end of the cosine")
    clip_grad: float = opt(0.02, "max global grad norm (MaskFeat clips at 0.02)")
    crop_min_scale: float = opt(0.5, "RandomResizedCrop minimum area fraction (MaskFeat: 0.5)")
    channels_last: bool = opt(False, "channels-last memory format (no effect on a ViT)")


PRESETS = {
    # CPU-sized: a 4-block, 128-wide ViT (0.8M parameters) at 64 px (4x4 tokens, 6 masked), batch 64,
    # 300 steps (~90 s on one thread of the shared 2-core machine, see the README's numbers).
    "shapes": {
        "model": "maskfeat_vit_small", "model_kwargs": {"embed_dim": 128, "depth": 4, "num_heads": 4},
        "resolution": 64, "batch_size": 64, "steps": 300, "warmup_steps": 20, "blr": 3e-3, "min_lr": 1e-5,
        "num_workers": 1, "log_every": 25, "eval_every": 150, "ckpt_every": 150, "eval_batch_size": 250,
        "probe_samples": 2000, "shapes": {"val_size": 500},
    },
    # The video twin: 4-frame clips of moving shapes at 64 px (2 x 4 x 4 = 32 tokens, 13 masked).
    "shapes_video": {
        "model": "maskfeat_vit_small", "model_kwargs": {"embed_dim": 128, "depth": 4, "num_heads": 4},
        "num_frames": 4, "resolution": 64, "batch_size": 32, "steps": 200, "warmup_steps": 20, "blr": 3e-3,
        "min_lr": 1e-5, "num_workers": 1, "log_every": 25, "eval_every": 100, "ckpt_every": 100,
        "eval_batch_size": 100, "probe_samples": 1000, "shapes": {"val_size": 300},
    },
}


@dataclass
class MaskFeatData(Data):
    probe: Split | None = None   # training samples with the eval transform, for probe features


def _augment(cfg: MaskFeatConfig, kind: str) -> str:
    return cfg.augment if cfg.augment != "auto" else ("none" if kind == "shapes" else "rrc")


def build_data(cfg: MaskFeatConfig, info: DistInfo) -> MaskFeatData:
    kind = data_mod.check(cfg.data, "data")
    if cfg.val_data:
        data_mod.check(cfg.val_data, "val_data")
    if cfg.num_frames > 1:
        return _clip_data(cfg, info, kind)
    common = dict(resolution=cfg.resolution, seed=cfg.seed, rank=info.rank, world=info.world, shapes=cfg.shapes)
    train = data_mod.open_split(cfg.data, "train", fields=("image",), augment=_augment(cfg, kind),
                                crop_min_scale=cfg.crop_min_scale, **common)
    if train is None:
        raise DataError(f"--data {cfg.data!r} has no training split")
    fields = ("image", "label") if train.class_names else ("image",)
    val = None
    if cfg.val_data or kind != "webdataset":  # WebDataset shards are held out only when given as val_data
        val = data_mod.open_eval(cfg.val_data or cfg.data, fields=fields, whole=bool(cfg.val_data), **common)
    probe = None
    if train.class_names and val is not None and cfg.probe != "none" and cfg.probe_samples > 0:
        probe = data_mod.open_eval(cfg.data, fields=fields, split="train", **common)
    if val is None and info.main:
        warnings.warn(f"no held-out split for {cfg.data!r} (give --val_data): training without evaluation")
    return MaskFeatData(train, val, train.class_names, fields, probe)


def _clip_data(cfg: MaskFeatConfig, info: DistInfo, kind: str) -> MaskFeatData:
    """Video clips: moving shapes, or frame folders (root/train, root/val when present)."""
    T, res = cfg.num_frames, cfg.resolution
    if kind == "webdataset":
        raise DataError("video clips come from --data shapes or a folder of frame directories, not WebDataset")
    stride = 1 if kind == "shapes" else cfg.frame_stride
    train_tf = make_clip_transform(res, T, stride, _augment(cfg, kind), cfg.crop_min_scale)
    eval_tf = make_clip_transform(res, T, stride, "none")

    def split(base, transform):
        return Split(Transformed(base, transform, cfg.seed), kind, len(base), base.class_names)

    if kind == "shapes":
        o = cfg.shapes
        clips = lambda s, n: MovingShapes(s, n, T, res, o.label, o.seed)  # noqa: E731
        train, val, probe = (split(clips("train", o.size), train_tf), split(clips("val", o.val_size), eval_tf),
                             split(clips("train", o.size), eval_tf))
    else:
        def folder(root):
            try:
                return FrameFolder(root)
            except FileNotFoundError as err:
                raise DataError(str(err)) from None

        root = data_mod._folder_split(cfg.data, "train")
        val_root = cfg.val_data or data_mod._folder_split(cfg.data, "val")
        train, probe = split(folder(root), train_tf), split(folder(root), eval_tf)
        val = split(folder(val_root), eval_tf) if val_root else None
    labelled = train.class_names is not None and val is not None and cfg.probe != "none"
    fields = ("image", "label") if train.class_names else ("image",)
    return MaskFeatData(train, val, train.class_names, fields, probe if labelled else None)


def build_model(cfg: MaskFeatConfig, device: str | torch.device | None = None):
    kw = dict(img_size=cfg.resolution, mask_ratio=cfg.mask_ratio, drop_path_rate=cfg.drop_path,
              num_frames=max(cfg.num_frames, 1), video_mask=cfg.video_mask, **cfg.model_kwargs)
    with torch.device(device) if device else contextlib.nullcontext():
        return models.create_model(cfg.model, **kw)


class StepMasks:
    """Masks for micro-batch m of step s on rank r, from a generator seeded by (seed, r, s, m): a pure
    function of the position in training, so a resumed run draws exactly the masks it would have."""

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank, self.last, self.micro = seed, rank, -1, 0
        self.generator = torch.Generator()

    def __call__(self, model, batch: int, step: int, device) -> torch.Tensor:
        self.micro = self.micro + 1 if step == self.last else 0
        self.last = step
        state = np.random.SeedSequence([self.seed, self.rank, step, self.micro]).generate_state(2, np.uint32)
        self.generator.manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
        return model.random_mask(batch, self.generator, device)


def build_task(cfg: MaskFeatConfig, data: MaskFeatData, info: DistInfo) -> Task:
    model = build_model(cfg)
    meta = build_model(cfg, "meta")
    shape = (1, 3, *((cfg.num_frames,) if cfg.num_frames > 1 else ()), cfg.resolution, cfg.resolution)
    macs = models.count_flops(meta, inputs=(torch.zeros(shape, device="meta"),
                                            torch.zeros(1, meta.patch_embed.num_patches, dtype=torch.bool,
                                                        device="meta")))
    masks = StepMasks(cfg.seed, info.rank)

    def loss(net, batch, step):
        x = batch["image"]
        mask = masks(model, x.shape[0], step, x.device)
        pred = net(x, mask)                        # (B, L, 108) dense: DDP / compile see static shapes
        target = model.forward_target(x, mask)     # (num_masked, 108), masked tokens only
        return model.forward_loss(pred, target, mask), {}

    def embed(module, batch):
        x = batch["image"]
        if cfg.num_frames > 1 and x.dim() == 4:
            raise ValueError("this is a video run: `kfe eval RUN` (without --probe) runs its k-NN and linear "
                             "probes on clips")
        return module.pooled(x)

    def evaluate(module, prepare):
        if data.val is None:
            return {}
        kw = dict(rank=info.rank, world=info.world, num_workers=min(cfg.num_workers, 2))
        val_loss, floor = _held_out_loss(module, eval_batches(data.val.dataset, cfg.eval_batch_size, **kw),
                                         prepare, info, cfg.seed)
        out = {"val_loss": val_loss, "val_loss_floor": floor}
        if data.probe is None:
            return out
        n_cls = len(data.class_names)
        fn = lambda b: embed(module, b)  # noqa: E731
        xtr, ytr = features(fn, eval_batches(data.probe.dataset, cfg.eval_batch_size, limit=cfg.probe_samples,
                                             **kw), prepare, info)
        xte, yte = features(fn, eval_batches(data.val.dataset, cfg.eval_batch_size, **kw), prepare, info)
        if cfg.probe in ("both", "knn"):
            out["knn_top1"] = knn_top1(xtr, ytr, xte, yte, n_cls)
        if cfg.probe in ("both", "linear"):
            out["linear_top1"] = linear_probe(xtr, ytr, xte, yte, n_cls, epochs=cfg.probe_epochs, seed=cfg.seed)
        out.update(chance=chance(yte, n_cls), n=int(yte.numel()), train_n=int(ytr.numel()))
        return out

    return Task(model=model, loss=loss, evaluate=evaluate, embed=embed, flops_per_sample=6.0 * macs,
                channels_last=False, describe=describe)


@torch.no_grad()
def _held_out_loss(module, batches, prepare, info: DistInfo, seed: int) -> tuple[float, float]:
    """(MaskFeat loss, constant-prediction floor) over the held-out split with masks fixed by the seed.

    The floor is the loss of the best constant prediction (the held-out mean target): the "chance" of
    this regression; a model below it predicts more than the average HOG."""
    gen = torch.Generator().manual_seed(seed + 7919)
    err_sum, tgt_sum, sq_sum, rows = 0.0, None, None, 0
    for batch in batches:
        x = prepare(batch)["image"]
        mask = module.random_mask(x.shape[0], gen, x.device)
        target = module.forward_target(x, mask).double()  # (M, K)
        err_sum += float(((module(x, mask)[mask].double() - target) ** 2).sum())
        tgt_sum = target.sum(0) if tgt_sum is None else tgt_sum + target.sum(0)
        sq_sum = (target ** 2).sum(0) if sq_sum is None else sq_sum + (target ** 2).sum(0)
        rows += target.shape[0]
    K = module.target_dim
    zeros = torch.zeros(K, dtype=torch.float64, device=info.device)
    sums = torch.cat([torch.tensor([err_sum, float(rows)], dtype=torch.float64, device=info.device),
                      zeros if tgt_sum is None else tgt_sum.to(info.device),
                      zeros if sq_sum is None else sq_sum.to(info.device)])
    dist_mod.all_reduce_sum(sums, info)
    n = float(sums[1].clamp_min(1))
    mean, sq = sums[2:2 + K] / n, sums[2 + K:] / n
    return float(sums[0]) / (n * K), float((sq - mean ** 2).clamp_min(0).mean())


def describe(m: dict) -> str:
    parts = [f"held-out MaskFeat loss {m['val_loss']:.4f} (constant-prediction floor {m['val_loss_floor']:.4f})"
             ] if "val_loss" in m else []
    probes = [f"{name} top-1 {percent(m[key])}" for name, key in (("k-NN", "knn_top1"), ("linear probe", "linear_top1"))
              if key in m]
    if probes:
        parts.append(", ".join(probes) + f" (chance {percent(m['chance'])}, {m['n']} held-out samples, "
                                          f"features of {m['train_n']} training samples)")
    return "; ".join(parts) or "no held-out evaluation"


BENCH = {  # kfe bench recipe maskfeat: (model, resolution, global batch, loader workers)
    "cpu": [("maskfeat_vit_small", 64, 32, 2)],
    "cuda": [("maskfeat_vit_base", 224, 256, 12)],
}

RECIPE = register(Recipe("maskfeat", MaskFeatConfig, build_data, build_task, PRESETS, bench=BENCH,
                         help="MaskFeat: masked HOG-feature prediction with a ViT, images or video clips"))
