"""CiT's data selection (Curation in Training, Xu et al., arXiv 2301.02241, Sec. 3, Alg. 1).

The outer loop of CiT embeds a batch of pool texts with the current text encoder and keeps the
texts whose best cosine similarity to the metadata (e.g. class names, averaged over templates) is
above a threshold; when fewer than `min_ratio` of the batch pass, the top `min_ratio` of the batch
is kept instead, so curation always makes progress. Selected samples collect in a `CuratedBuffer`
on which the inner loop trains for `curate_every` steps. Defaults follow the official code:
threshold 0.55, min_ratio 0.003; the fallback keeps max(1, floor(min_ratio * batch)) samples.

This file is the pure selection logic; the training loop (`kfe train cit`) plugs it in.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _check_emb(name: str, t) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 2-D floating tensor (rows, D), got {got}")


def metadata_embeddings(emb: torch.Tensor) -> torch.Tensor:
    """Metadata embeddings from per-template text embeddings: (C, T, D) -> (C, D), each template's
    embedding L2-normalised, averaged over the T templates, normalised again (CLIP zero-shot style).
    A (C, D) input (no templates) is just normalised."""
    if not isinstance(emb, torch.Tensor) or emb.dim() not in (2, 3) or not emb.is_floating_point():
        raise ValueError("emb must be a floating (C, D) or (C, T, D) tensor")
    emb = F.normalize(emb.float() if emb.dtype in (torch.float16, torch.bfloat16) else emb, dim=-1)
    return F.normalize(emb.mean(dim=1), dim=-1) if emb.dim() == 3 else emb


def max_similarity(text_emb: torch.Tensor, meta_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each text, the largest cosine similarity to any metadata entry and that entry's index:
    text_emb (N, D), meta_emb (M, D) -> (scores (N,), entry (N,) int64). Computed in float32 (float64
    if either input is)."""
    _check_emb("text_emb", text_emb)
    _check_emb("meta_emb", meta_emb)
    if text_emb.shape[1] != meta_emb.shape[1]:
        raise ValueError(f"text_emb and meta_emb must share D, got {text_emb.shape[1]} and {meta_emb.shape[1]}")
    if meta_emb.shape[0] == 0:
        raise ValueError("meta_emb is empty: CiT needs at least one metadata entry")
    dtype = torch.float64 if torch.float64 in (text_emb.dtype, meta_emb.dtype) else torch.float32
    sims = F.normalize(text_emb.to(dtype), dim=1) @ F.normalize(meta_emb.to(dtype), dim=1).T  # (N, M)
    if sims.shape[0] == 0:
        return sims.new_zeros(0), torch.zeros(0, dtype=torch.long, device=sims.device)
    return sims.max(dim=1)


@dataclass
class Selection:
    mask: torch.Tensor  # (N,) bool: selected
    scores: torch.Tensor  # (N,) max cosine similarity to the metadata
    entry: torch.Tensor  # (N,) int64: the best-matching metadata entry
    fallback: bool  # True when too few passed the threshold and the top min_ratio were taken

    @property
    def indices(self) -> torch.Tensor:
        return self.mask.nonzero().flatten()


def select(text_emb: torch.Tensor, meta_emb: torch.Tensor, threshold: float = 0.55,
           min_ratio: float = 0.003) -> Selection:
    """CiT's selection for one pool batch: score > threshold, or the top max(1, floor(min_ratio * N))
    by score when fewer than min_ratio * N pass (min_ratio = 0 disables the fallback)."""
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    scores, entry = max_similarity(text_emb, meta_emb)
    n = scores.shape[0]
    mask = scores > threshold
    fallback = n > 0 and min_ratio > 0 and int(mask.sum()) < min_ratio * n
    if fallback:
        k = max(1, int(min_ratio * n))
        mask = torch.zeros_like(mask)
        mask[scores.topk(k).indices] = True
    return Selection(mask, scores, entry, fallback)


class CuratedBuffer:
    """The curated samples of CiT's outer loop, until the inner loop has `capacity` of them
    (curate_every * batch_size in CiT). Items are anything (ids, sample dicts); order is kept."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.items: list = []
        self.seen = 0  # pool samples scored since the last take()
        self.selected = 0

    def add(self, items: Sequence, selection: Selection | torch.Tensor) -> int:
        """Append the selected items of a batch (a Selection or a (N,) bool mask); returns how many."""
        mask = selection.mask if isinstance(selection, Selection) else selection
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (len(items),):
            raise ValueError(f"selection must be a ({len(items)},) bool mask (one per item), got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        picked = [items[i] for i in mask.nonzero().flatten().tolist()]
        self.items += picked
        self.seen += len(items)
        self.selected += len(picked)
        return len(picked)

    @property
    def full(self) -> bool:
        return len(self.items) >= self.capacity

    @property
    def ratio(self) -> float:
        """Fraction of the scored pool that was selected (CiT logs it per curation round)."""
        return self.selected / self.seen if self.seen else 0.0

    def take(self) -> list:
        """The first `capacity` items (the rest stay for the next round); resets the ratio counters."""
        out, self.items = self.items[:self.capacity], self.items[self.capacity:]
        self.seen = self.selected = 0
        return out

    def __len__(self) -> int:
        return len(self.items)
