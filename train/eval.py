"""Held-out evaluation helpers shared by the recipes: top-1, features, k-NN and linear-probe accuracy.

- top-1: argmax of a classifier over the held-out split (each rank its share, counts all-reduced).
  `chance` is the majority-class rate of the held-out labels (1 / classes when balanced): the
  accuracy a constant guess gets, printed next to every accuracy.
- k-NN (Wu et al. 2018; DINO's protocol): cosine similarity of L2-normalised features, the k nearest
  training features vote with weight exp(sim / T); k = 20, T = 0.07.
- Linear probe (MAE, Sec. 4 / Appendix A.2): a linear classifier on frozen features, standardised by
  the training-feature mean and std (MAE's affine-free BatchNorm), trained with AdamW + cosine.
- Zero-shot (CLIP, Radford et al. 2021, Sec. 3.1.4, prompt ensembling): every class name is put into
  each prompt template, the prompts are encoded by the text tower and L2-normalised, averaged per
  class and normalised again; an image is assigned the class whose embedding has the largest cosine
  similarity with its (normalised) image embedding; top-1 and chance as above.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from train import dist as dist_mod
from train.dist import DistInfo


def _label_hist(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(labels[labels >= 0].cpu(), minlength=num_classes)[:num_classes].double()


@torch.no_grad()
def top1(classify: Callable[[dict], torch.Tensor], batches: Iterable[dict], prepare: Callable[[dict], dict],
         info: DistInfo, num_classes: int) -> dict:
    """{"top1", "chance", "n", "class_top1"} of `classify(batch) -> logits` over all ranks' shares of the
    held-out data (class_top1: each class's accuracy)."""
    hits, hist = torch.zeros(num_classes, dtype=torch.float64), torch.zeros(num_classes, dtype=torch.float64)
    for batch in batches:
        batch = prepare(batch)
        pred = classify(batch).float().argmax(-1)
        hits += _label_hist(batch["label"][pred == batch["label"]], num_classes)
        hist += _label_hist(batch["label"], num_classes)
    sums = torch.cat([hits, hist]).to(info.device)
    dist_mod.all_reduce_sum(sums, info)
    hits, hist = sums.cpu().split(num_classes)
    n = float(hist.sum())
    if n == 0:
        raise ValueError("the held-out split yielded no labelled samples")
    # per-class accuracy (None for a class absent from the held-out data): long-tail evaluations (MetaCLIP)
    class_top1 = [float(h / c) if c > 0 else None for h, c in zip(hits, hist)]
    return {"top1": float(hits.sum()) / n, "chance": float(hist.max()) / n, "n": int(n), "class_top1": class_top1}


@torch.no_grad()
def features(embed: Callable[[dict], torch.Tensor], batches: Iterable[dict], prepare: Callable[[dict], dict],
             info: DistInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32, labels (N,)) of every rank's batches, gathered on every rank (CPU)."""
    feats, labels = [], []
    for batch in batches:
        batch = prepare(batch)
        feats.append(embed(batch).float().cpu())
        labels.append(batch["label"].cpu())
    local = (torch.cat(feats) if feats else torch.zeros(0, 0), torch.cat(labels) if labels else
             torch.zeros(0, dtype=torch.long))
    parts = dist_mod.all_gather_objects(local, info)
    parts = [p for p in parts if p[0].numel()]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def chance(labels: torch.Tensor, num_classes: int) -> float:
    hist = _label_hist(labels, num_classes)
    return float(hist.max() / hist.sum())


@torch.no_grad()
def knn_top1(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
             num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted k-NN accuracy on L2-normalised features (cosine similarity)."""
    if train_x.shape[0] == 0 or test_x.shape[0] == 0:
        raise ValueError("knn_top1 needs non-empty train and test features")
    k = min(k, train_x.shape[0])
    train_x, test_x = F.normalize(train_x.float(), dim=1), F.normalize(test_x.float(), dim=1)
    correct = 0
    for i in range(0, test_x.shape[0], chunk):
        sim = test_x[i:i + chunk] @ train_x.T                     # (c, N_train)
        top_sim, top_idx = sim.topk(k, dim=1)                      # (c, k)
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())
        correct += int((votes.argmax(1) == test_y[i:i + chunk]).sum())
    return correct / test_x.shape[0]


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, epochs: int = 100, lr: float = 1e-2, weight_decay: float = 0.0,
                 batch: int = 1024, seed: int = 0) -> float:
    """Top-1 of a linear classifier trained on frozen, standardised features (deterministic by seed)."""
    if train_x.shape[0] == 0 or test_x.shape[0] == 0:
        raise ValueError("linear_probe needs non-empty train and test features")
    mean, std = train_x.float().mean(0), train_x.float().std(0).clamp_min(1e-6)
    xtr, xte = (train_x.float() - mean) / std, (test_x.float() - mean) / std
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(xtr.shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=gen)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(xtr.shape[0] / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(xtr.shape[0], generator=gen)
            for i in range(0, xtr.shape[0], batch):
                idx = perm[i:i + batch]
                loss = F.cross_entropy(head(xtr[idx]), train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    with torch.no_grad():
        return float((head(xte).argmax(1) == test_y).float().mean())


def percent(x: float) -> str:
    return f"{100 * x:.1f}%"


@contextlib.contextmanager
def seeded(device: torch.device, seed: int):
    """Run an evaluation on a seeded RNG (fixed masks / noise) without moving the training's RNG stream
    (DataLoader iterators and random masking draw from the global generator)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def prompts(class_names: list[str], templates: list[str]) -> list[list[str]]:
    """(C, T) prompts: each template's "{}" replaced by each class name."""
    if not class_names or not templates:
        raise ValueError("zero-shot needs at least one class name and one template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"every template needs a '{{}}' for the class name, got {bad}")
    return [[t.replace("{}", c) for t in templates] for c in class_names]


@torch.no_grad()
def zero_shot_weights(encode_text: Callable[[list[str]], torch.Tensor], class_prompts: list[list[str]],
                      chunk: int = 1024) -> torch.Tensor:
    """(C, D) class embeddings: encode_text(list of T texts) -> (T, D); normalise, average, normalise."""
    flat = [p for row in class_prompts for p in row]
    emb = torch.cat([encode_text(flat[i:i + chunk]).float() for i in range(0, len(flat), chunk)])
    emb = F.normalize(emb, dim=-1).view(len(class_prompts), len(class_prompts[0]), -1)  # (C, T, D)
    return F.normalize(emb.mean(dim=1), dim=-1)


@torch.no_grad()
def zero_shot_top1(encode_image: Callable[[torch.Tensor], torch.Tensor], weights: torch.Tensor,
                   batches: Iterable[dict], prepare: Callable[[dict], dict], info: DistInfo) -> dict:
    """{"top1", "chance", "n"}: argmax over classes of cos(image embedding, class embedding)."""
    def classify(batch):
        return F.normalize(encode_image(batch["image"]).float(), dim=-1) @ weights.to(batch["image"].device).T

    return top1(classify, batches, prepare, info, weights.shape[0])
