"""VLPart's language classifier and its losses (Detic / VLPart: facebookresearch/Detic, facebookresearch/VLPart).

- `TextClassifier`: RoI features -> a linear projection to the text-embedding width -> L2-normalised ->
  cosine similarity with the (frozen, L2-normalised) text embeddings of the vocabulary, times a learned
  temperature, plus a bias that starts at the sigmoid prior (-4.6: p = 0.01 per class, Detic's
  use_bias). Detic fixes the temperature at 50; here it is learned (log-parametrised, starts at 50).
  The vocabulary is an argument of `forward`, so any set of names works at test time.
- `sigmoid_ce`: per-class binary cross-entropy against the one-hot of the matched class (background =
  all zeros), summed over classes and averaged over proposals (Detic's use_sigmoid_ce).
- `image_label_loss`: Detic's "max-size" weak supervision: the largest proposal of an image that has
  only image-level labels takes all of them (sigmoid CE with a multi-hot target).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TextClassifier(nn.Module):
    def __init__(self, in_features: int, embed_dim: int, temperature: float = 50.0, prior: float = 0.01):
        super().__init__()
        self.proj = nn.Linear(in_features, embed_dim)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        self.bias = nn.Parameter(torch.tensor(math.log(prior / (1 - prior))))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(R, in_features) RoI features -> (R, embed_dim) unit vectors."""
        return F.normalize(self.proj(x), dim=-1)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(R, in_features), (C, embed_dim) text embeddings -> (R, C) logits."""
        if text.dim() != 2 or text.shape[1] != self.proj.out_features:
            raise ValueError(f"text embeddings must be (C, {self.proj.out_features}), got {tuple(text.shape)}")
        sim = self.embed(x) @ F.normalize(text.to(x.dtype), dim=-1).t()
        return sim * self.log_temperature.exp() + self.bias


def sigmoid_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (R, C); labels (R,) in 0..C with 0 = background and c >= 1 = vocabulary entry c - 1."""
    if logits.shape[0] == 0:
        return logits.sum() * 0
    if int(labels.max()) > logits.shape[1] or int(labels.min()) < 0:
        raise ValueError(f"labels must be in 0..{logits.shape[1]} (0 = background), got {labels.min()}..{labels.max()}")
    target = torch.zeros(logits.shape[0], logits.shape[1] + 1, device=logits.device, dtype=logits.dtype)
    target[torch.arange(logits.shape[0], device=logits.device), labels] = 1
    loss = F.binary_cross_entropy_with_logits(logits, target[:, 1:], reduction="none")
    return loss.sum() / logits.shape[0]


def largest_proposal(boxes: torch.Tensor) -> int:
    """Index of the largest-area box (x0, y0, x1, y1) of one image."""
    return int(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).argmax())


def image_label_loss(logits: torch.Tensor, boxes: torch.Tensor, image_labels: list[int]) -> torch.Tensor:
    """Detic's max-size loss for one image: logits (R, C) of its proposals, boxes (R, 4); the largest
    proposal's logits against the multi-hot of `image_labels` (vocabulary indices), summed over classes."""
    if logits.shape[0] == 0:
        return logits.sum() * 0
    row = logits[largest_proposal(boxes)]
    target = torch.zeros_like(row)
    target[list(image_labels)] = 1
    return F.binary_cross_entropy_with_logits(row, target, reduction="sum")
