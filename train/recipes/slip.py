"""`slip`: CLIP + SimCLR multi-task pre-training (SLIP, Mu et al., arXiv 2112.12750, Sec. 3).

Each image gives three views (train/data/simclr.py): the CLIP view, scored against the caption with
kfe::contrastive_loss (all-gathered across processes, as in `clip`), and two SimCLR views through the
vision tower and the 3-layer `image_mlp` head, scored with NT-Xent at temperature 0.1
(models.clip.nt_xent). loss = clip + ssl_scale * simclr (SLIP's SLIPLoss, ssl_scale 1).

Defaults are SLIP's ViT-B/16 recipe on YFCC15M (the official repository's README, "SLIP ViT-Base with
8-nodes (batch size 4096)": lr 3e-3, weight decay 0.1; main.py: 25 epochs, 1 warmup epoch, AdamW betas
(0.9, 0.98), cosine to 1e-5, SimCLR head 4096 -> 4096 -> 256). blr 1.875e-4 is 3e-3 at batch 4096.
The SimCLR term is SLIP's SIMCLRLoss: each process's views against every process's views (gathered
with gradients), which on one process is models.clip.nt_xent. The head's BatchNorm is SyncBatchNorm
in SLIP (models.py `_build_mlp`): batch statistics over all processes. Multi-process GPU runs convert
it (`sync_batchnorm`; same state-dict keys). torch's SyncBatchNorm refuses CPU tensors in a
multi-process group (ValueError "expected input tensor to be on GPU", torch 2.13), so multi-process
CPU (gloo) runs keep per-process statistics and are not exactly one process on the global batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import models
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from train.config import opt
from train.data.simclr import SlipViews
from train.dist import DistInfo
from train.recipes.base import Recipe, Task, register
from train.recipes.clip import SHAPES, ClipConfig, _json, core
from train.recipes.image_text import (Captioner, ImageTextData, balancer, build_model, describe, open_data,
                                      tokenizer_state, zero_shot_evaluator)


@dataclass
class SlipConfig(ClipConfig):
    model: str = opt("slip_vit_base_patch16", "registered model name (slip_vit_small/base/large_patch16)")
    blr: float = opt(1.875e-4, "base lr: lr = blr * batch_size / 256 (SLIP ViT-B: 3e-3 at 4096)")
    weight_decay: float = opt(0.1, "AdamW weight decay (SLIP: 0.1; not on norms / biases / temperature)")
    ssl_scale: float = opt(1.0, "weight of the SimCLR loss")
    ssl_temp: float = opt(0.1, "NT-Xent temperature")
    ssl_mlp_dim: int = opt(4096, "SimCLR head hidden width")
    ssl_emb_dim: int = opt(256, "SimCLR head output width")
    ssl_crop_min_scale: float = opt(0.08, "SimCLR views: RandomResizedCrop minimum area fraction")


PRESETS = {"shapes": {**SHAPES, "model": "slip_vit_small_patch16", "ssl_mlp_dim": 256, "ssl_emb_dim": 64}}


def simclr_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over all processes' views (SLIP's SIMCLRLoss): this process's rows of view 1 against every
    view-2 row (positive: the same sample) and every other view-1 row, and symmetrically; mean of both."""
    from engine.ops.contrastive.dist import _GatherRows, resolve_group

    q1, q2 = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)  # (b, D) each
    group, offset, k1, k2 = resolve_group(None), 0, q1, q2
    if group is not None:
        offset = tdist.get_rank(group) * q1.shape[0]
        k1, k2 = _GatherRows.apply(q1, group), _GatherRows.apply(q2, group)  # (W * b, D)
    labels = torch.arange(offset, offset + q1.shape[0], device=q1.device)
    self_mask = F.one_hot(labels, k1.shape[0]).bool()  # a view is not its own negative
    l11 = (q1 @ k1.T / temperature).masked_fill(self_mask, float("-inf"))
    l22 = (q2 @ k2.T / temperature).masked_fill(self_mask, float("-inf"))
    l12, l21 = q1 @ k2.T / temperature, q2 @ k1.T / temperature
    return (F.cross_entropy(torch.cat([l12, l11], 1), labels) + F.cross_entropy(torch.cat([l21, l22], 1), labels)) / 2


def sync_batchnorm(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """SLIP's SyncBatchNorm in the SimCLR head for multi-process GPU runs; unchanged otherwise (one
    process: plain BN is the same function; CPU: torch's SyncBatchNorm supports GPUs only)."""
    if info.world > 1 and info.device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_data(cfg: SlipConfig, info: DistInfo) -> ImageTextData:
    data = open_data(cfg, info, "slip")
    ds = data.train.dataset  # Transformed or WebDatasetStream: both apply `.transform(image, rng)`
    ds.transform = SlipViews(ds.transform, cfg.resolution, cfg.ssl_crop_min_scale)
    return data


def build_task(cfg: SlipConfig, data: ImageTextData, info: DistInfo) -> Task:
    extra = dict(ssl_mlp_dim=cfg.ssl_mlp_dim, ssl_emb_dim=cfg.ssl_emb_dim)
    model = sync_batchnorm(build_model(cfg, data.tokenizer, **extra), info)
    # eval mode: one sample per view, and the head's BatchNorm refuses a batch of 1 in training (same FLOPs)
    meta = build_model(cfg, data.tokenizer, "meta", **extra).eval()
    image = torch.zeros(1, 3, cfg.resolution, cfg.resolution, device="meta")
    text = torch.zeros(1, cfg.context_length, dtype=torch.long, device="meta")
    macs = models.count_flops(meta, inputs=(image, text, image, image))  # CLIP pair + two SimCLR views
    captioner = Captioner(cfg, data.tokenizer, data.file_captions, balancer(cfg, data))

    def loss(net, batch, step):
        views = batch["image"]  # (B, 3, 3 views, H, W): CLIP view, SimCLR view 1, view 2
        out = net(views[:, :, 0], captioner(batch, step, views.device), views[:, :, 1], views[:, :, 2])
        clip = core(net).clip_loss(out)
        ssl = simclr_loss(out["aug1_embed"], out["aug2_embed"], cfg.ssl_temp)
        return clip + cfg.ssl_scale * ssl, {"clip_loss": clip.detach(), "ssl_loss": ssl.detach()}

    def embed(module, batch):
        return module.image_features(batch["image"])

    state, load_state = tokenizer_state(data)
    return Task(model=model, loss=loss, evaluate=zero_shot_evaluator(cfg, data, info), embed=embed,
                flops_per_sample=6.0 * macs, describe=describe, state_dict=state, load_state_dict=load_state,
                run_files={"tokenizer.json": _json(data.tokenizer)})


# kfe bench recipe slip: the shapes preset's model on the CPU (as the README's run), the paper's on a GPU
BENCH = {"cpu": [(None, 32, 128, 1)], "cuda": [(None, 224, 128, 12)]}

RECIPE = register(Recipe("slip", SlipConfig, build_data, build_task, PRESETS,
                         help="SLIP: CLIP + SimCLR on two augmented views (SLIP's ViT recipe); zero-shot eval",
                         bench=BENCH))
