"""What the image-text recipes (clip, slip, cit) share: config keys, data + tokenizer, captions, the
model, zero-shot evaluation.

Captions become token ids in the loss, on the training process: the batch's captions (or, with
`captions_file`, the file's caption for each sample index) -> optional bag-of-words transform
(`--captions bow`: train/curation/bow.py, keyed by (step, sample) so a resumed run draws the same
words) -> the tokenizer (train/data/tokenizer.py) -> (B, context_length) ids.

Tokenizer: `word` (vocabulary built from the first `vocab_samples` training captions, in data order,
identically on every process), `byte` (no vocabulary) or `clip` (CLIP's BPE, train/data/clip_bpe.py);
`auto` = clip for metaclip_* models, word for `shapes`, byte otherwise.
The tokenizer is written to <run>/tokenizer.json and saved in every checkpoint; a resumed run reads
the run directory's copy, and resume / `kfe eval` check that the tokenizer matches the checkpoint's.

Zero-shot (train/eval.py): class names of the held-out split (`shapes` class names, ImageFolder folder
names with "_" -> " ") in prompt templates: for shapes, "a {size} {colour} {}" over every size and
colour (the captions' own phrasing; per label kind); for an ImageFolder the model was trained on
(captions = class names) just "{}"; otherwise CLIP's 7-template ImageNet ensemble. `kfe eval
--zeroshot` (train/zeroshot.py) is the papers' protocol on any labelled set (80 templates, top-1/top-5).

OpenAI-layout models (metaclip_*, models/openai_clip.py) get CLIP's image mean / std and its eval crop
(shorter side resized to the crop size); `--pretrained FILE` loads released weights (models.load_pretrained).
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

import models
from train import data as data_mod
from train import dist as dist_mod
from train.config import ConfigError, opt
from train.curation.bow import BagOfWords, WordBalancer, bag_of_words
from train.data import DataError, eval_batches
from train.data import shapes as shapes_mod
from train.data import tokenizer as tok_mod
from train.dist import DistInfo
from train.eval import percent, prompts, zero_shot_top1, zero_shot_weights
from train.recipes.base import Data, TrainConfig

# CLIP's 7-template ImageNet ensemble (openai/CLIP, notebooks/Prompt_Engineering_for_ImageNet.ipynb).
CLIP_TEMPLATES = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                  "a {} in a video game.", "art of the {}.", "a photo of the small {}."]
RECIPE_SET = ("img_size", "image_size", "vocab_size", "context_length", "eot_token_id")  # model keys the recipe sets


@dataclass
class ImageTextConfig(TrainConfig):
    model: str = opt("clip_vit_base_patch16", "registered model name (clip_vit_* / slip_vit_*)")
    model_kwargs: dict = opt({}, "create_model overrides, e.g. {\"vision\": {\"depth\": 2, \"patch_size\": 8}, "
                                 "\"embed_dim\": 64, \"transformer_layers\": 2}")
    tokenizer: Literal["auto", "word", "byte", "clip"] = opt("auto", "auto: clip (CLIP's BPE) for metaclip_* models, "
                                                            "word for shapes, byte otherwise")
    bpe_vocab: str = opt("", "clip tokenizer: the BPE merges file ('' = the copy open_clip_torch ships)")
    pretrained: str = opt("", "initial weights: an open_clip / MetaCLIP / SLIP / `kfe export` file (strict)")
    context_length: int = opt(77, "text tokens per caption, <sot> and <eot> included (CLIP: 77)")
    vocab_samples: int = opt(100_000, "word tokenizer: training captions read to build the vocabulary")
    vocab_min_count: int = opt(1, "word tokenizer: minimum count of a vocabulary word")
    vocab_max_size: int = opt(49_404, "word tokenizer: most words kept (+4 specials = CLIP's 49408)")
    captions: Literal["raw", "bow"] = opt("raw", "bow: bag-of-words captions (A Fistful of Words)")
    bow_t: float = opt(0.0, "bow: word balancing threshold t (fraction of captions; 0 = no balancing)")
    bow_formula: Literal["sqrt", "linear"] = opt("sqrt", "bow: keep p = min(1, sqrt(t/f)) or min(1, t/f)")
    captions_file: str = opt("", "JSONL {\"index\": i, \"caption\": text} (e.g. kfe pseudo-bow) replacing the "
                                 "captions of a map-style dataset (shapes / ImageFolder)")
    zeroshot_templates: list[str] = opt([], "zero-shot prompt templates, '{}' = class name ([] = per data)")


@dataclass
class ImageTextData(Data):
    tokenizer: tok_mod.Tokenizer | None = None
    file_captions: dict[int, str] | None = None
    templates: list[str] | None = None
    kind: str = ""
    metadata: list[str] | None = None  # CiT's metadata entries


# ---------------------------------------------------------------- data

def _augment(cfg, kind: str) -> str:
    # shapes captions name positions ("at the top left", "left of"): no crops or flips there.
    return cfg.augment if cfg.augment != "auto" else ("none" if kind == "shapes" else "rrc")


def _read_captions_file(path: str, size: int | None) -> dict[int, str]:
    if not os.path.isfile(path):
        raise DataError(f"--captions_file {path!r}: no such file")
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                    out[int(rec["index"])] = str(rec["caption"])
                except (ValueError, KeyError, TypeError):
                    raise DataError(f"--captions_file {path}:{n}: expected {{\"index\": int, \"caption\": str}}, "
                                    f"got {line.strip()[:80]!r}") from None
    missing = sum(1 for i in range(size or 0) if i not in out)
    if missing:
        raise DataError(f"--captions_file {path} has no caption for {missing} of the {size} training samples")
    return out


def open_data(cfg: ImageTextConfig, info: DistInfo, recipe: str, fields=("image", "caption")) -> ImageTextData:
    """Training split (image + caption), the held-out split for zero-shot (image + label, with class
    names), the tokenizer; every path is checked before anything is built."""
    kind = data_mod.check(cfg.data, "data")
    if cfg.val_data:
        data_mod.check(cfg.val_data, "val_data")
    if cfg.captions_file and kind in ("webdataset", "curated"):
        raise DataError("--captions_file replaces captions by sample index: map-style data only (shapes, ImageFolder)")
    train = data_mod.open_split(cfg.data, "train", resolution=cfg.resolution, fields=fields,
                                augment=_augment(cfg, kind), seed=cfg.seed, rank=info.rank, world=info.world,
                                shapes=cfg.shapes, crop_min_scale=cfg.crop_min_scale)
    if train is None:
        raise DataError(f"--data {cfg.data!r} has no training split")
    file_captions = _read_captions_file(cfg.captions_file, train.size) if cfg.captions_file else None
    if kind == "folder" and train.class_names is None and file_captions is None:
        raise DataError(f"{cfg.data!r} is an unlabelled ImageFolder: its images have no captions; give "
                        "--captions_file (e.g. from `kfe pseudo-bow`) or class folders")
    val = data_mod.open_eval(cfg.val_data or cfg.data, resolution=cfg.resolution, fields=("image", "label"),
                             seed=cfg.seed, rank=info.rank, world=info.world, shapes=cfg.shapes,
                             whole=bool(cfg.val_data), crop_pct=eval_crop_pct(cfg))
    names = val.class_names if val is not None else None
    if names is None:
        if info.main:
            warnings.warn(f"no labelled held-out split with class names for {cfg.val_data or cfg.data!r} (give "
                          "--val_data shapes or an ImageFolder with class folders): no zero-shot evaluation")
        val = None
    data = ImageTextData(train, val, [n.replace("_", " ") for n in names] if names else None, fields,
                         file_captions=file_captions, kind=kind)
    data.tokenizer = make_tokenizer(cfg, info, data, recipe)
    data.templates = list(cfg.zeroshot_templates) or default_templates(cfg, kind)
    return data


def default_templates(cfg, kind: str) -> list[str]:
    if kind == "shapes" and kind_of_val(cfg) == "shapes":
        sizes, colors, names = shapes_mod.SIZE_NAMES, shapes_mod.COLOR_NAMES, shapes_mod.SHAPES
        label = cfg.shapes.label
        if label == "shape":
            return [f"a {s} {c} {{}}" for s in sizes for c in colors]
        if label == "color":
            return [f"a {s} {{}} {n}" for s in sizes for n in names]
        if label == "position":                     # single-object captions: "a large red circle at the top left"
            return [f"a {s} {c} {n} {{}}" for s in sizes for c in colors for n in names]
        return [f"a {s} {{}}" for s in sizes]      # shape_color class names: "red circle"
    if kind == "folder":
        return ["{}"]                               # trained on class-name captions
    return list(CLIP_TEMPLATES)


def kind_of_val(cfg) -> str:
    return data_mod.kind_of(cfg.val_data or cfg.data)


# ---------------------------------------------------------------- captions and tokenizer

class Captioner:
    """batch -> (B, context_length) token ids on `device` (see the module doc)."""

    def __init__(self, cfg: ImageTextConfig, tokenizer: tok_mod.Tokenizer, file_captions=None,
                 balancer: WordBalancer | None = None):
        self.tokenizer, self.context_length, self.file_captions = tokenizer, cfg.context_length, file_captions
        self.bow = BagOfWords(seed=cfg.seed, balancer=balancer) if cfg.captions == "bow" else None

    def texts(self, batch: dict, step: int) -> list[str]:
        ids = batch["index"].tolist() if "index" in batch else batch.get("key") or range(len(batch["caption"]))
        texts = [self.file_captions[i] for i in ids] if self.file_captions is not None else list(batch["caption"])
        if self.bow is not None:
            texts = [self.bow(t, key=f"{step}:{i}") for t, i in zip(texts, ids)]
        return texts

    def __call__(self, batch: dict, step: int, device) -> torch.Tensor:
        return self.tokenizer(self.texts(batch, step), self.context_length).to(device, non_blocking=True)


def _vocab_captions(cfg: ImageTextConfig, data: ImageTextData) -> list[str]:
    """The first `vocab_samples` training captions (spread evenly over a map-style dataset)."""
    n = cfg.vocab_samples
    split = data.train
    if data.file_captions is not None:
        caps = [data.file_captions[i] for i in sorted(data.file_captions)]
        idx = np.linspace(0, len(caps) - 1, min(n, len(caps))).round().astype(int)
        return [caps[i] for i in idx]
    if split.kind == "webdataset":
        from train.data.webdataset import _caption, iter_tar

        out = []
        for shard in split.dataset.shards:
            for _, _, parts in iter_tar(shard):
                cap = _caption(parts) if parts else None
                if cap:
                    out.append(cap)
                if len(out) >= n:
                    return out
        return out
    base = split.dataset.base
    idx = np.linspace(0, len(base) - 1, min(n, len(base))).round().astype(int)
    if split.kind == "shapes":
        return [base.caption(int(i)) for i in idx]
    return [base.class_names[base.labels[i]] for i in idx if base.labels[i] >= 0]  # ImageFolder


def tokenizer_path(cfg, recipe_name: str) -> str:
    from train.trainer import default_run_dir  # (train.trainer imports the recipes: import here)

    return os.path.join(default_run_dir(recipe_name, cfg), "tokenizer.json")


def make_tokenizer(cfg: ImageTextConfig, info: DistInfo, data: ImageTextData, recipe: str) -> tok_mod.Tokenizer:
    choice = cfg.tokenizer
    if choice == "auto":
        choice = "clip" if cfg.model.startswith("metaclip_") else "word" if data.kind == "shapes" else "byte"
    if choice == "byte":
        return tok_mod.ByteTokenizer()
    if choice == "clip":
        from train.data.clip_bpe import ClipBPETokenizer

        try:
            return ClipBPETokenizer(cfg.bpe_vocab)
        except (FileNotFoundError, ValueError) as err:
            raise DataError(str(err)) from None
    desc, error = None, None
    if info.main:  # rank 0 reads the captions once; every rank gets the same vocabulary
        path = tokenizer_path(cfg, recipe)
        try:
            if cfg.resume and os.path.isfile(path):
                desc = tok_mod.load(path).to_dict()
            else:
                caps = _vocab_captions(cfg, data)
                if cfg.captions == "bow":
                    caps = [" ".join(bag_of_words(c)) for c in caps]
                desc = tok_mod.WordTokenizer.build(caps, cfg.vocab_min_count, cfg.vocab_max_size).to_dict()
        except ValueError as err:
            error = f"word tokenizer for {cfg.data!r}: {err}"
    desc, error = dist_mod.broadcast_object((desc, error), info)
    if error:
        raise DataError(error)
    return tok_mod.from_dict(desc)


def balancer(cfg: ImageTextConfig, data: ImageTextData) -> WordBalancer | None:
    if cfg.captions != "bow" or cfg.bow_t <= 0:
        return None
    return WordBalancer.fit(_vocab_captions(cfg, data), t=cfg.bow_t, formula=cfg.bow_formula)


def tokenizer_state(data: ImageTextData):
    """(state_dict, load_state_dict) for Task: the checkpoint keeps the tokenizer; loading checks it."""
    def state() -> dict:
        return {"tokenizer": data.tokenizer.to_dict()}

    def load(saved: dict) -> None:
        mine, theirs = data.tokenizer.to_dict(), saved.get("tokenizer")
        if theirs is not None and theirs != mine:
            other = tok_mod.from_dict(theirs)
            raise ConfigError(f"the checkpoint's tokenizer ({other!r}) differs from the one built for this run "
                              f"({data.tokenizer!r}): the data's captions or the tokenizer options changed")
    return state, load


# ---------------------------------------------------------------- model and evaluation

def build_model(cfg: ImageTextConfig, tokenizer: tok_mod.Tokenizer, device=None, **extra):
    kw = dict(cfg.model_kwargs)
    clash = [k for k in RECIPE_SET if k in kw]
    if clash:
        raise ConfigError(f"model_kwargs {clash} are set by the recipe (from resolution, the tokenizer and "
                          "context_length): remove them")
    kw.update(img_size=cfg.resolution, vocab_size=tokenizer.vocab_size, context_length=cfg.context_length,
              eot_token_id=tokenizer.eot_token_id, **extra)
    with torch.device(device) if device else contextlib.nullcontext():
        try:
            model = models.create_model(cfg.model, **kw)
        except TypeError as err:  # e.g. the shapes preset's SLIP-layout model_kwargs for a metaclip_* model
            raise ConfigError(f"--model_kwargs {json.dumps(cfg.model_kwargs)} do not fit {cfg.model}: {err}") from None
    if cfg.pretrained and device is None:
        try:
            models.load_pretrained(model, cfg.pretrained)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"--pretrained: {err}") from None
    return model


# OpenAI CLIP's image normalisation (open_clip's OPENAI_DATASET_MEAN / _STD): what the OpenAI-layout
# (MetaCLIP) models are trained and released with
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def eval_crop_pct(cfg: ImageTextConfig) -> float:
    """CLIP's eval transform resizes the shorter side to the crop size (crop_pct 1); ImageNet-style 0.875."""
    return 1.0 if cfg.model.startswith("metaclip_") else 0.875


def image_stats(cfg: ImageTextConfig) -> dict:
    """Task(mean=, std=) for the model: CLIP's for metaclip_* models, ImageNet's (the default) otherwise."""
    return {"mean": CLIP_MEAN, "std": CLIP_STD} if cfg.model.startswith("metaclip_") else {}


def forward_macs(cfg: ImageTextConfig, model_meta) -> int:
    """Multiply-accumulates of one image + one caption through both towers."""
    image = torch.zeros(1, 3, cfg.resolution, cfg.resolution, device="meta")
    text = torch.zeros(1, cfg.context_length, dtype=torch.long, device="meta")
    return models.count_flops(model_meta, inputs=(image, text))


def zero_shot_evaluator(cfg: ImageTextConfig, data: ImageTextData, info: DistInfo):
    """task.evaluate: zero-shot top-1 on the held-out split (nothing when it has no class names)."""
    def evaluate(module, prepare) -> dict:
        if data.val is None or not data.class_names:
            return {}
        table = prompts(data.class_names, data.templates)
        if cfg.captions == "bow":  # prompts in the captions' form (no stop-words), deterministic order
            table = [[" ".join(bag_of_words(p)) for p in row] for row in table]

        def encode_text(texts):
            return module.encode_text(data.tokenizer(texts, cfg.context_length).to(info.device))

        weights = zero_shot_weights(encode_text, table)
        batches = eval_batches(data.val.dataset, cfg.eval_batch_size, info.rank, info.world,
                               num_workers=min(cfg.num_workers, 2))
        out = zero_shot_top1(module.encode_image, weights, batches, prepare, info)
        what = cfg.shapes.label.replace("_", "+") if kind_of_val(cfg) == "shapes" else "folder"
        return {**out, "classes": len(table), "class_kind": what, "prompts": len(table[0])}
    return evaluate


def describe(m: dict) -> str:
    kind = {"color": "colour", "shape": "shape", "shape+color": "shape+colour"}.get(m.get("class_kind"), "")
    line = (f"held-out zero-shot top-1 {percent(m['top1'])} (chance {percent(m['chance'])}; {m['n']} images, "
            f"{m['classes']} {kind + ' ' if kind else ''}classes x {m['prompts']} prompts)")
    if "ema_top1" in m:
        line += f", EMA zero-shot top-1 {percent(m['ema_top1'])}"
    return line
