"""AdamW with the usual no-decay groups, linear warmup + cosine schedule, and weight EMA.

- lr = blr * batch / 256 (the linear scaling rule of MAE / ConvNeXt V2; ConvNeXt's 4e-3 at batch
  4096 is blr 2.5e-4), unless an absolute lr is given.
- 1-D parameters (norm weights, biases, layer-scale gamma) and GRN's (1, 1, 1, C) gamma / beta get no
  weight decay, as in the official ConvNeXt / MAE optimizers (ConvNeXt V2's also skips *.gamma, *.beta).
- The schedule is a pure function of the step: warmup from lr/W to lr over W steps, then cosine to
  min_lr at the last step.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, skip: tuple[str, ...] = ()) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith((".bias", ".gamma", ".beta")) or any(s in name for s in skip):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def scaled(groups: list[dict], lr: float) -> list[dict]:
    """Groups with an "lr_scale" (layer-wise decay, train/lr_decay.py) get lr * lr_scale as their own lr:
    the schedule multiplies each group's initial lr, so the scale holds at every step."""
    return [{**g, "lr": lr * g["lr_scale"]} if "lr_scale" in g else g for g in groups]


def adamw(groups: list[dict], lr: float, betas: tuple[float, float], device: torch.device) -> torch.optim.AdamW:
    # fused AdamW is one kernel per step on CUDA; the default foreach path elsewhere.
    fused = device.type == "cuda"
    return torch.optim.AdamW(scaled(groups, lr), lr=lr, betas=tuple(betas), fused=fused or None)


class LARS(torch.optim.Optimizer):
    """LARS (You et al., arXiv 1708.03888) as MAE's linear probe uses it (util/lars.py): for parameters
    with more than one dimension the update (grad + wd * w) is scaled by trust * |w| / |update| (1 when
    either norm is 0); biases and norm parameters take the plain update; then SGD momentum."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    w_norm, d_norm = torch.norm(p), torch.norm(d)
                    one = torch.ones_like(w_norm)
                    q = torch.where(w_norm > 0, torch.where(d_norm > 0, g["trust_coefficient"] * w_norm / d_norm,
                                                            one), one)
                    d = d.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(g["momentum"]).add_(d)
                p.add_(state["mu"], alpha=-g["lr"])


def lars(groups: list[dict], lr: float, betas, device) -> LARS:
    """The trainer's optimizer signature (betas unused: LARS has momentum 0.9)."""
    return LARS(scaled(groups, lr), lr=lr)


class WarmupCosine:
    """LambdaLR multiplier: (s + 1) / W for s < W, then cosine from 1 to min_lr / lr at the last step."""

    def __init__(self, total: int, warmup: int, min_ratio: float):
        self.total, self.warmup, self.min_ratio = total, warmup, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(self.total - self.warmup, 1)
        progress = min((step - self.warmup) / span, 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def scheduler(opt: torch.optim.Optimizer, total: int, warmup: int, lr: float, min_lr: float):
    return torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(total, warmup, min_lr / lr if lr > 0 else 0.0))


def ema_decay_at(decay: float, step: int) -> float:
    """EMA warm-up as timm's ModelEmaV3 (use_warmup, gamma 1, power 2/3): update `step` (1-based) copies
    the weights at step 1, then uses min(decay, 1 - (1 + s) ** -2/3), s = step - 1, so a short run's EMA
    is not mostly its random initialisation."""
    s = step - 1
    return 0.0 if s <= 0 else max(min(1.0 - (1.0 + s) ** (-2.0 / 3.0), decay), 0.0)


class EMA:
    """Exponential moving average of a model's weights: ema = decay * ema + (1 - decay) * w, every step.

    Kept in float32 on the training device; buffers are copied. `module` is an ordinary nn.Module
    (evaluated like the model; saved in checkpoints as its state dict).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(model).float().eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def decay_at(self, step: int | None) -> float:
        return ema_decay_at(self.decay, step) if self.warmup and step is not None else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        ema_p = list(self.module.parameters())
        src = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src, 1.0 - self.decay_at(step))
        for eb, b in zip(self.module.buffers(), model.buffers()):
            eb.copy_(b)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.module.load_state_dict(sd)
