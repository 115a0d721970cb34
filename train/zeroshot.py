"""Zero-shot classification as the CLIP papers evaluate it: `kfe eval RUN_OR_CKPT --zeroshot DIR_OR_JSON`.

Protocol (CLIP, Radford et al. 2021, Sec. 3.1.4; MetaCLIP reports ImageNet top-1 this way): every class
name is put into every prompt template; the prompts are encoded by the text tower and L2-normalised,
averaged per class in embedding space and normalised again (train.eval.zero_shot_weights); an image's
normalised embedding is scored by cosine similarity against the C class embeddings; top-1 and top-5.

DIR_OR_JSON is one of:
- an ImageFolder directory (<dir>/<class>/<image>) or WebDataset shards with labels (.cls members):
  the images to classify. Class names are the folder names ('_' -> ' '), except a 1000-folder
  ImageNet layout (WordNet ids n01440764 ...), which gets OpenAI's ImageNet class names;
- a JSON file {"data": DIR_OR_SHARDS (optional), "classnames": [...] (optional), "templates": [...]
  (optional)}: without "data" the run's own held-out split (e.g. shapes val) is classified.
Images: resized and centre-cropped to the run's resolution (OpenAI-layout models: shorter side to the crop
size, bicubic, as CLIP's eval transform; others: to resolution / 0.875) and normalised as in training.
Templates default to OpenAI's 80 ImageNet templates; they and the 1000 class names ship with KFE
(train/data/zeroshot_imagenet.json, from openai/CLIP's Prompt_Engineering_for_ImageNet notebook).
"""
from __future__ import annotations

import json
import os
import re
from importlib import resources

import torch
import torch.nn.functional as F

from train import dist as dist_mod
from train.data import DataError, eval_batches, kind_of, open_eval
from train.eval import percent, prompts, zero_shot_weights
from train.recipes.image_text import eval_crop_pct

WNID = re.compile(r"n\d{8}")


def imagenet() -> dict:
    """{"classnames": 1000 names, "templates": 80 templates} shipped with the package."""
    return json.loads(resources.files("train.data").joinpath("zeroshot_imagenet.json").read_text("utf-8"))


def read_spec(arg: str) -> dict:
    """--zeroshot argument -> {"data": spec or None, "classnames": list or None, "templates": list or None}."""
    if arg.endswith(".json"):
        if not os.path.isfile(arg):
            raise DataError(f"--zeroshot {arg!r}: no such JSON file")
        try:
            with open(arg, encoding="utf-8") as f:
                spec = json.load(f)
        except ValueError as err:
            raise DataError(f"--zeroshot {arg}: not valid JSON ({err})") from None
        if not isinstance(spec, dict) or set(spec) - {"data", "classnames", "templates"}:
            raise DataError(f"--zeroshot {arg}: expected an object with keys data / classnames / templates")
        for key in ("classnames", "templates"):
            value = spec.get(key)
            if value is not None and (not isinstance(value, list) or not value
                                      or not all(isinstance(v, str) for v in value)):
                raise DataError(f"--zeroshot {arg}: {key!r} must be a non-empty list of strings")
        return {"data": spec.get("data"), "classnames": spec.get("classnames"), "templates": spec.get("templates")}
    return {"data": arg, "classnames": None, "templates": None}


def class_names(folder_names: list[str] | None) -> list[str] | None:
    """Readable class names of a held-out split: OpenAI's for an ImageNet (WordNet-id) layout."""
    if folder_names is None:
        return None
    if len(folder_names) == 1000 and all(WNID.fullmatch(n) for n in folder_names):
        return imagenet()["classnames"]
    return [n.replace("_", " ") for n in folder_names]


@torch.no_grad()
def zero_shot_topk(encode_image, weights: torch.Tensor, batches, prepare, info, ks=(1, 5)) -> dict:
    """{"top1", "top5", "chance", "n"} over every rank's share of the batches (counts all-reduced)."""
    C = weights.shape[0]
    ks = [k for k in ks if k <= C] or [1]
    correct, hist = torch.zeros(len(ks), dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    for batch in batches:
        batch = prepare(batch)
        label = batch["label"]
        logits = F.normalize(encode_image(batch["image"]).float(), dim=-1) @ weights.to(label.device).T
        top = logits.topk(max(ks), dim=-1).indices  # (B, kmax)
        hit = top == label[:, None]
        for i, k in enumerate(ks):
            correct[i] += hit[:, :k].any(-1).sum().double().cpu()
        hist += torch.bincount(label[label >= 0].cpu(), minlength=C)[:C].double()
    sums = torch.cat([correct, hist]).to(info.device)
    dist_mod.all_reduce_sum(sums, info)
    sums = sums.cpu()
    n = float(sums[len(ks):].sum())
    if n == 0:
        raise DataError("the zero-shot split yielded no labelled images")
    out = {f"top{k}": float(sums[i]) / n for i, k in enumerate(ks)}
    return {**out, "chance": float(sums[len(ks):].max()) / n, "n": int(n)}


def evaluate(module, tokenizer, context_length: int, names: list[str], templates: list[str], batches, prepare,
             info) -> dict:
    device = next(module.parameters()).device

    def encode_text(texts):
        return module.encode_text(tokenizer(texts, context_length).to(device))

    weights = zero_shot_weights(encode_text, prompts(names, templates))
    out = zero_shot_topk(module.encode_image, weights, batches, prepare, info)
    return {**out, "classes": len(names), "templates": len(templates)}


def evaluate_checkpoint(path: str, arg: str, ema: bool = False, overrides: list[str] | None = None) -> dict:
    """`kfe eval PATH --zeroshot ARG`: zero-shot top-1 / top-5 of a clip / slip / cit checkpoint."""
    from train.run import load_for_eval

    spec = read_spec(arg)
    recipe, cfg, data, task, module, prepare, info, step = load_for_eval(path, overrides, ema)
    tokenizer = getattr(data, "tokenizer", None)
    if tokenizer is None or not hasattr(module, "encode_text"):
        raise ValueError(f"recipe {recipe.name} has no text tower: zero-shot needs a clip / slip / cit run")
    if spec["data"]:
        split = open_eval(spec["data"], resolution=cfg.resolution, fields=("image", "label"), seed=cfg.seed,
                          rank=info.rank, world=info.world, shapes=cfg.shapes, whole=True,
                          crop_pct=eval_crop_pct(cfg))
        if split is None:
            raise DataError(f"--zeroshot data {spec['data']!r} has no labelled images")
        names = spec["classnames"] or class_names(split.class_names)
        if names is None:
            raise DataError(f"--zeroshot data {spec['data']!r} ({kind_of(spec['data'])}) carries no class names: "
                            "give them in a JSON file {\"data\": ..., \"classnames\": [...]}")
        if split.class_names is not None and len(names) != len(split.class_names):
            raise DataError(f"--zeroshot: {len(names)} class names for {len(split.class_names)} classes")
    else:
        split, names = data.val, spec["classnames"] or data.class_names
        if split is None or names is None:
            raise DataError(f"the run's data {cfg.val_data or cfg.data!r} has no labelled held-out split with class "
                            "names; give --zeroshot DIR (an ImageFolder) or a JSON file with \"data\"")
    templates = spec["templates"] or imagenet()["templates"]
    batches = eval_batches(split.dataset, cfg.eval_batch_size, info.rank, info.world, num_workers=0)
    with torch.no_grad():
        metrics = evaluate(module, tokenizer, cfg.context_length, names, templates, batches, prepare, info)
    if info.main:
        top5 = f", top-5 {percent(metrics['top5'])}" if "top5" in metrics else ""
        print(f"{path} (step {step}{', EMA' if ema else ''}): zero-shot top-1 {percent(metrics['top1'])}{top5} "
              f"(chance {percent(metrics['chance'])}; {metrics['n']} images, {metrics['classes']} classes x "
              f"{metrics['templates']} templates)", flush=True)
    dist_mod.shutdown()
    return metrics
