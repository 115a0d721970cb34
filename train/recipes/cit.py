"""`cit`: Curation in Training (CiT, Xu et al., arXiv 2301.02241, Sec. 3, Alg. 1).

Outer loop (every `curate_every` optimizer steps): embed the metadata (class names, each put into the
`metadata_templates`, per-template embeddings normalised and averaged: train/curation/cit.py) and then
batch after batch of the raw pool's captions with the *current* text encoder; keep the pairs whose
best cosine similarity to any metadata entry is above `threshold`, or the top `min_ratio` of a pool
batch when too few pass (cit.select), until the curated buffer holds curate_every x (per-process)
batch pairs (cit.CuratedBuffer; what overflows waits for the next round). Inner loop: train on the
buffer's pairs, in selection order, for curate_every steps, with CiT's image->text contrastive loss
(the official CiTCLIPLossGrad: images of this process against the texts of every process) or
CLIP's symmetric one. Curation embeds with the pooled text-tower features before the projection, as
the official code does (`curate_space text`; `joint` uses the projected embedding).

Defaults are the official yfcc15m_in1k_mocob16 run (facebookresearch/CiT run_configs.py, configs.py,
main.py): 5000 steps of 16384 pairs (1024 x 16 GPUs), AdamW lr 5e-4 (betas 0.9/0.999, eps 1e-8),
weight decay 0.2 and 1.0 on the two projections, warmup 200 steps (5000 / 25), cosine to 1e-5,
curate every 100 steps, threshold 0.55, min_ratio 0.003, no templates. The paper trains the text
tower against a frozen pre-trained image tower (official `trainable_weight="head-all"`: the vision
backbone frozen, its projection head and the whole text side trained), and so does this recipe by
default whenever `--init_image RUN` gives one (RUN: a clip / slip / cit run or checkpoint whose
`visual.*` weights are loaded): `visual.*` frozen, `image_projection` still trained. Without
--init_image the tower starts random and trains (the `shapes` preset); `--freeze_image false|true`
overrides either way. Differences: the pool batch is the training batch (official: 2x), and the buffer
keeps the overflow instead of dropping it.

Each process curates its own share of the pool. The buffer is saved in checkpoints (sample indices
for map-style pools, re-read on resume; the samples themselves for WebDataset streams), so a resumed
run continues on exactly the same curated batches.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from train import checkpoint as ckpt_mod
from train.config import ConfigError, opt
from train.curation.cit import CuratedBuffer, metadata_embeddings, select
from train.curation.metadata import load_metadata
from train.data import DataError
from train.dist import DistInfo
from train.eval import percent, prompts
from train.recipes.base import Recipe, Task, register
from train.recipes.clip import SHAPES, ClipConfig, _json, core
from train.recipes.image_text import (Captioner, ImageTextData, balancer, build_model, describe, forward_macs,
                                      open_data, tokenizer_state, zero_shot_evaluator)


@dataclass
class CitConfig(ClipConfig):
    batch_size: int = opt(16384, "global batch per optimizer step (CiT: 1024 x 16 GPUs)")
    steps: int = opt(5000, "training length in optimizer steps (CiT: 5000)")
    warmup_steps: int = opt(200, "warmup steps (CiT: steps / 25)")
    lr: float = opt(5e-4, "absolute peak lr (CiT: 5e-4, not scaled with the batch)")
    weight_decay: float = opt(0.2, "AdamW weight decay (CiT: 0.2)")
    head_weight_decay: float = opt(1.0, "weight decay of image_projection / text_projection (CiT: 1.0)")
    betas: tuple[float, ...] = opt((0.9, 0.999), "AdamW betas (CiT: torch's default)")
    curate_every: int = opt(100, "optimizer steps trained on each curated buffer")
    threshold: float = opt(0.55, "keep pool texts whose max cosine similarity to the metadata is above this")
    min_ratio: float = opt(0.003, "fallback: keep the top min_ratio of a pool batch when fewer pass")
    metadata: str = opt("", "metadata entries: JSON list or one per line ('' = the held-out data's class names)")
    metadata_templates: list[str] = opt(["{}"], "templates for the metadata entries ('{}' = entry; CiT: none)")
    curate_space: Literal["text", "joint"] = opt("text", "text: pooled text features before the projection "
                                                 "(official); joint: the projected embedding")
    loss: Literal["image_to_text", "symmetric"] = opt("image_to_text", "CiT's image->text loss, or CLIP's")
    freeze_image: bool | None = opt(None, "freeze the vision tower (visual.*; image_projection still trains); "
                                          "default: frozen when --init_image gives a pretrained one (CiT)")
    init_image: str = opt("", "run dir or checkpoint whose visual.* weights initialise the vision tower")


# shapes: the CLIP preset; the pool is the shapes training split, the metadata its class names: the preset
# labels shapes by colour, so the 8 colour names.
# 20-step rounds; min_ratio 0.25 keeps rounds short while the random text encoder scores poorly.
# The vision tower starts random here, so it trains (freeze_image false even with --init_image).
PRESETS = {"shapes": {**SHAPES, "steps": 400, "curate_every": 20, "min_ratio": 0.25, "lr": 0.0,
                      "warmup_steps": 30, "eval_every": 100, "ckpt_every": 100, "freeze_image": False}}


def freezes_image(cfg: CitConfig) -> bool:
    """Whether the vision tower is frozen: as set, else CiT's setting (frozen iff a pretrained one is given)."""
    return bool(cfg.init_image) if cfg.freeze_image is None else cfg.freeze_image


def _read_metadata(path: str) -> list[str]:
    """The entries of --metadata (train/curation/metadata.py, the loader `kfe curate metaclip` uses)."""
    try:
        return load_metadata(path)
    except ValueError as err:
        raise DataError(f"--metadata: {err}") from None


def build_data(cfg: CitConfig, info: DistInfo) -> ImageTextData:
    if cfg.curate_every < 1:
        raise ConfigError(f"curate_every must be >= 1, got {cfg.curate_every}")
    if cfg.init_image:
        _checkpoint_file(cfg.init_image)
    meta = _read_metadata(cfg.metadata) if cfg.metadata else None
    data = open_data(cfg, info, "cit")
    data.metadata = meta or data.class_names
    if not data.metadata:
        raise DataError("CiT needs metadata: give --metadata FILE (the pool's data names no classes)")
    return data


def _checkpoint_file(path: str) -> str:
    if os.path.isdir(path):
        found = ckpt_mod.find_resume(path, "auto")
        if found is None:
            raise DataError(f"--init_image {path!r}: no checkpoint in that directory")
        return found
    if not os.path.isfile(path):
        raise DataError(f"--init_image {path!r}: no such checkpoint")
    return path


def image_to_text_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CiT's loss: cross-entropy of this process's images over every process's texts (mean over the
    local rows; the text gather sums gradients back, so DDP equals one process on the global batch)."""
    from engine.ops.contrastive.dist import _GatherRows, resolve_group

    group, offset = resolve_group(None), 0
    if group is not None:
        offset = tdist.get_rank(group) * image.shape[0]
        text = _GatherRows.apply(text, group)  # (W * b, D)
    logits = scale.float() * image.float() @ text.float().T  # (b, W * b)
    return F.cross_entropy(logits, torch.arange(offset, offset + image.shape[0], device=image.device))


def _split(batch: dict, epoch: int | None) -> list[dict]:
    out = []
    for i, caption in enumerate(batch["caption"]):
        item = {"image": batch["image"][i], "caption": caption, "label": int(batch["label"][i])}
        if "index" in batch:
            item["index"] = int(batch["index"][i])
            item["_key"] = (epoch, item["index"])
        if "key" in batch:
            item["key"] = batch["key"][i]
        out.append(item)
    return out


def _collate(items: list[dict]) -> dict:
    batch = {"image": torch.stack([it["image"] for it in items]),
             "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
             "caption": [it["caption"] for it in items]}
    if "index" in items[0]:
        batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
    if "key" in items[0]:
        batch["key"] = [it["key"] for it in items]
    return batch


class Curator:
    """CiT's outer loop as the trainer's batch source (Task.batches) with a checkpointable state."""

    def __init__(self, cfg: CitConfig, data: ImageTextData, captioner: Captioner, info: DistInfo):
        self.cfg, self.data, self.captioner, self.info = cfg, data, captioner, info
        self.table = prompts(data.metadata, list(cfg.metadata_templates))  # (C, T)
        self.buffer: CuratedBuffer | None = None
        self.round: list[dict] = []
        self.pos, self.rounds, self.stats = 0, 0, {}
        self.pending: dict | None = None

    def _encode(self, module, texts: list[str]) -> torch.Tensor:
        ids = self.data.tokenizer(texts, self.cfg.context_length).to(self.info.device)
        return module.text_features(ids) if self.cfg.curate_space == "text" else module.encode_text(ids)

    @torch.no_grad()
    def _curate(self, pool, loader, module) -> None:
        C, T = len(self.table), len(self.table[0])
        meta = metadata_embeddings(self._encode(module, [p for row in self.table for p in row]).view(C, T, -1))
        fallbacks = 0
        while not self.buffer.full:
            batch = next(pool)
            emb = self._encode(module, self.captioner.texts(batch, self.rounds))
            sel = select(emb, meta, self.cfg.threshold, self.cfg.min_ratio)
            epoch = None if loader.stream else (loader.consumed - 1) // loader.batches_per_epoch
            self.buffer.add(_split(batch, epoch), sel.mask.cpu())
            fallbacks += int(sel.fallback)
        self.stats = {"curated_ratio": self.buffer.ratio, "pool_scored": self.buffer.seen,
                      "fallback_batches": fallbacks, "curation_rounds": self.rounds + 1}
        self.round, self.pos = self.buffer.take(), 0
        self.rounds += 1

    def batches(self, loader, module):
        b = loader.batch
        if self.buffer is None:
            self.buffer = CuratedBuffer(self.cfg.curate_every * self.cfg.accum_steps * b)
        if self.pending is not None:
            self._restore(self.pending, loader)
            self.pending = None
        pool = iter(loader)
        while True:
            if self.pos * b >= len(self.round):
                self._curate(pool, loader, module)
            items = self.round[self.pos * b:(self.pos + 1) * b]
            self.pos += 1
            yield _collate(items)

    # ---------------------------------------------------------------- checkpoint state

    def state_dict(self) -> dict:
        if self.buffer is None:
            return {}
        stream = "_key" not in (self.round or self.buffer.items or [{}])[0]

        def pack(items):  # map-style: (epoch, index) keys re-read on resume; streams: the samples
            return [dict(it) for it in items] if stream else [it["_key"] for it in items]
        return {"stream": stream, "round": pack(self.round), "buffer": pack(self.buffer.items), "pos": self.pos,
                "rounds": self.rounds, "seen": self.buffer.seen, "selected": self.buffer.selected,
                "capacity": self.buffer.capacity, "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        self.pending = state or None

    def _restore(self, state: dict, loader) -> None:
        if state["capacity"] != self.buffer.capacity:
            raise ConfigError(f"the checkpoint's curated buffer holds {state['capacity']} pairs per process, this "
                              f"run {self.buffer.capacity}: resume with the same curate_every, batch and processes")

        def unpack(items):
            if state["stream"]:
                return [dict(it) for it in items]
            out = []
            for epoch, index in items:
                sample = loader.dataset[(epoch, index)]
                sample["_key"] = (epoch, index)
                out.append(sample)
            return out
        self.round, self.buffer.items = unpack(state["round"]), unpack(state["buffer"])
        self.pos, self.rounds, self.stats = state["pos"], state["rounds"], dict(state["stats"])
        self.buffer.seen, self.buffer.selected = state["seen"], state["selected"]


def _load_image_tower(model, path: str) -> None:
    sd = ckpt_mod.load(_checkpoint_file(path))["model"]
    vision = {k: v for k, v in sd.items() if k.startswith("visual.")}
    if not vision:
        raise ConfigError(f"--init_image {path}: the checkpoint has no visual.* weights")
    missing = [k for k in model.state_dict() if k.startswith("visual.") and k not in vision]
    if missing:
        raise ConfigError(f"--init_image {path}: vision tower does not match (missing {missing[:3]})")
    model.load_state_dict(vision, strict=False)


def build_task(cfg: CitConfig, data: ImageTextData, info: DistInfo) -> Task:
    model = build_model(cfg, data.tokenizer)
    if cfg.init_image:
        _load_image_tower(model, cfg.init_image)
    frozen = freezes_image(cfg)
    if frozen:
        model.visual.requires_grad_(False)
    meta = build_model(cfg, data.tokenizer, "meta")
    macs = forward_macs(cfg, meta)
    if frozen:  # no backward through a frozen vision tower: 2 instead of 6 FLOPs per MAC there
        import models

        macs -= 2 / 3 * models.count_flops(meta.visual, (1, 3, cfg.resolution, cfg.resolution))
    captioner = Captioner(cfg, data.tokenizer, data.file_captions, balancer(cfg, data))
    curator = Curator(cfg, data, captioner, info)
    zero_shot = zero_shot_evaluator(cfg, data, info)

    def loss(net, batch, step):
        out = net(batch["image"], captioner(batch, step, batch["image"].device))
        if cfg.loss == "symmetric":
            return core(net).clip_loss(out), {}
        return image_to_text_loss(out["image_embed"], out["text_embed"], out["logit_scale"]), {}

    def evaluate(module, prepare):
        return {**zero_shot(module, prepare), **curator.stats}

    def param_groups(module):
        decay, no_decay, head = [], [], []
        for name, p in module.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name.endswith(".bias") else
                 head if name in ("image_projection", "text_projection") else decay).append(p)
        return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
                {"params": head, "weight_decay": cfg.head_weight_decay}]

    tok_state, tok_load = tokenizer_state(data)

    def state_dict():
        return {**tok_state(), "curator": curator.state_dict()}

    def load_state_dict(saved):
        tok_load(saved)
        curator.load_state_dict(saved.get("curator", {}))

    return Task(model=model, loss=loss, evaluate=evaluate, embed=lambda m, b: m.image_features(b["image"]),
                flops_per_sample=6.0 * macs, describe=describe_cit, param_groups=param_groups,
                batches=curator.batches, state_dict=state_dict, load_state_dict=load_state_dict,
                run_files={"tokenizer.json": _json(data.tokenizer)})


def describe_cit(m: dict) -> str:
    parts = [describe(m)] if "top1" in m else []
    if "curated_ratio" in m:
        parts.append(f"curation round {m['curation_rounds']} kept {percent(m['curated_ratio'])} of "
                     f"{m['pool_scored']} pool pairs ({m['fallback_batches']} pool batches by the top-ratio fallback)")
    return "; ".join(parts) or "no held-out evaluation"


# kfe bench recipe cit: the shapes preset's model on the CPU (as the README's run), the paper's on a GPU
BENCH = {"cpu": [(None, 32, 128, 1)], "cuda": [(None, 224, 256, 12)]}

RECIPE = register(Recipe("cit", CitConfig, build_data, build_task, PRESETS,
                         help="CiT: CLIP trained on pool data curated in training by text similarity to metadata",
                         bench=BENCH))
