"""The recipe contract: a config dataclass + functions that build the data and the task the trainer runs.

    register(Recipe("mae", MAEConfig, build_data, build_task, presets={"shapes": {...}}, help="..."))

- `build_data(cfg, info) -> Data` opens the datasets; it runs first and must fail fast (missing paths)
  before any model is built.
- `build_task(cfg, data, info) -> Task` builds the model and the loss: `task.loss(model, batch, step)`
  returns (mean loss over this process's micro-batch, {extra scalars}). `batch` is on the device with
  "image" float, normalised (channels-last if task.channels_last), "label" a long tensor, "caption" a
  list of strings. The trainer handles DDP/FSDP, autocast, accumulation, clipping, EMA, checkpoints,
  logging; the recipe never sees them (distributed losses use torch.distributed directly).
- `task.evaluate(module, prepare) -> {metric: value}` runs on every rank (each on its share of the
  held-out data, reduced across ranks) with the unwrapped model or its EMA; `prepare(batch)` moves a
  loader batch to the device and normalises it as training does.
- `task.embed(module, batch) -> (N, D)` features, when the recipe has them: `kfe eval --probe knn`
  and `--probe linear` (train/eval.py) use it; self-supervised recipes evaluate this way.
- Optional, for recipes that choose their own training batches or keep state of their own (CiT's
  curation): `task.batches(loader, module) -> iterator of batches` replaces `iter(loader)` (it may
  draw any number of loader batches per training batch); `task.state_dict()` / `task.load_state_dict()`
  are saved per rank in checkpoints (`"task"`) and restored on resume (and by `kfe eval`, rank 0's);
  `task.run_files` ({name: text}) are written into the run directory at the start (e.g. tokenizer.json).

TrainConfig holds the keys every recipe shares; a recipe's config subclasses it and sets its paper's
defaults (cite the table).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import torch
from torch import nn

from train.config import opt
from train.data import ShapesOptions, Split
from train.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from train.dist import DistInfo


@dataclass
class TrainConfig:
    # data
    data: str = opt("shapes", "'shapes' | ImageFolder dir | WebDataset shards 'dir/{00000..00099}.tar'")
    val_data: str = opt("", "held-out data (default: the val split of `data`, if it has one)")
    resolution: int = opt(224, "image side in pixels")
    augment: Literal["auto", "none", "flip", "rrc"] = opt("auto", "auto: rrc for real images, none for shapes")
    crop_min_scale: float = opt(0.08, "RandomResizedCrop minimum area fraction")
    samples_per_epoch: int = opt(0, "epoch length for streams (WebDataset); 0 = give --steps")
    num_workers: int = opt(8, "DataLoader worker processes per rank")
    shapes: ShapesOptions = field(default_factory=ShapesOptions)
    # schedule and batch
    batch_size: int = opt(4096, "global batch per optimizer step (all ranks x accumulation)")
    accum_steps: int = opt(1, "gradient accumulation micro-steps per optimizer step")
    epochs: float = opt(300.0, "training length in epochs (ignored when steps > 0)")
    steps: int = opt(0, "training length in optimizer steps (0 = from epochs)")
    warmup_epochs: float = opt(20.0, "linear warmup length in epochs")
    warmup_steps: int = opt(-1, "warmup in steps (>= 0 overrides warmup_epochs)")
    # optimizer
    blr: float = opt(2.5e-4, "base lr: lr = blr * batch_size / 256")
    lr: float = opt(0.0, "absolute peak lr (> 0 overrides blr)")
    min_lr: float = opt(1e-6, "lr at the end of the cosine")
    weight_decay: float = opt(0.05, "AdamW weight decay (not on norms / biases)")
    betas: tuple[float, ...] = opt((0.9, 0.999), "AdamW betas")
    clip_grad: float = opt(0.0, "max global grad norm (0 = no clipping; the norm is logged anyway)")
    ema: bool = opt(False, "keep an EMA of the weights (evaluated and checkpointed too)")
    ema_decay: float = opt(0.9999, "EMA decay per step")
    ema_warmup: bool = opt(False, "EMA decay warm-up as timm's ModelEmaV3 (1 - (1 + step) ** -2/3, up to ema_decay)")
    # launch
    device: str = opt("auto", "auto | cpu | cuda")
    precision: Literal["auto", "fp32", "bf16"] = opt("auto", "auto: bf16 autocast on GPU, fp32 on CPU")
    compile: bool = opt(False, "torch.compile the model")
    compile_blocks: bool = opt(False, "torch.compile each block in place (composes with FSDP2; instead of --compile)")
    act_ckpt: bool = opt(False, "activation checkpointing per block: recompute in the backward, keep only each "
                                "block's input")
    channels_last: bool = opt(True, "channels-last memory format (for conv nets)")
    dist: Literal["ddp", "fsdp"] = opt("ddp", "data parallel: DDP, or FSDP2 fully_shard for large models")
    async_ckpt: bool = opt(False, "FSDP2: write sharded checkpoints in the background (committed at the next "
                                  "save or the end)")
    deterministic: bool = opt(False, "deterministic algorithms (bit-exact reruns; slower)")
    seed: int = opt(0, "seed of the model init, data order and augmentation")
    threads: int = opt(0, "torch CPU threads per process (0 = auto: 1 on shapes data, else cores / local "
                          "processes; see train/threads.py)")
    # outputs
    out: str = opt("", "run directory (default runs/<recipe>-<data>)")
    resume: str = opt("", "'' = fresh run, 'auto' = newest checkpoint in `out`, or a checkpoint path")
    log_every: int = opt(10, "steps between metrics lines")
    eval_every: int = opt(0, "steps between held-out evaluations (0 = at the end only)")
    ckpt_every: int = opt(1000, "steps between checkpoints (one is always written at the end)")
    keep_ckpts: int = opt(2, "checkpoints kept (0 = all)")
    eval_batch_size: int = opt(256, "per-rank batch size for evaluation")
    progress: bool = opt(True, "tqdm progress bar")
    tensorboard: bool = opt(False, "also log to <out>/tb (needs the tensorboard package)")
    profile: int = opt(0, "record this many steps (after one warm-up step) with torch.profiler: "
                          "<out>/trace-rank<r>.json + the top ops by self time (0 = off)")


@dataclass
class Data:
    train: Split
    val: Split | None
    class_names: list[str] | None = None
    fields: tuple[str, ...] = ("image",)


@dataclass
class Task:
    model: nn.Module
    loss: Callable[[nn.Module, dict, int], tuple[torch.Tensor, dict]]
    evaluate: Callable[[nn.Module, Callable[[dict], dict]], dict] | None = None
    embed: Callable[[nn.Module, dict], torch.Tensor] | None = None
    flops_per_sample: float | None = None        # training FLOPs per sample (fwd + bwd), for MFU
    channels_last: bool = False
    param_groups: Callable[[nn.Module], list[dict]] | None = None  # (wrapped-in-place module) -> groups;
    #                                              default: AdamW decay / no-decay split
    shard_units: list[nn.Module] | None = None   # FSDP2 units (default: modules named *Block)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    describe: Callable[[dict], str] | None = None  # eval metrics -> one line a person reads
    batches: Callable[[object, nn.Module], Iterator[dict]] | None = None  # (Loader, module) -> training
    #                                              batches (default: iter(loader)); see the module doc
    state_dict: Callable[[], dict] | None = None   # recipe state for checkpoints (per rank)
    load_state_dict: Callable[[dict], None] | None = None
    run_files: dict[str, str] = field(default_factory=dict)  # written into the run directory at the start
    optimizer: Callable | None = None  # (groups, lr, betas, device) -> Optimizer (default: train.optim.adamw)


@dataclass
class Recipe:
    name: str
    config: type
    build_data: Callable[[object, DistInfo], Data]
    build_task: Callable[[object, Data, DistInfo], Task]
    presets: dict[str, dict] = field(default_factory=dict)
    help: str = ""
    export: Callable[[dict], dict] | None = None  # trained state dict -> official keys (default: as is)
    bench: dict[str, list[tuple]] | None = None   # `kfe bench recipe`: {device type: [(model, res, batch,
    #                                              workers), ...], "data": built-in data if not shapes} (default:
    #                                              train/bench.py's ConvNeXt settings)
    resolve: Callable[[object], None] | None = None  # fills config values that depend on others (e.g. drop
    #                                              path per model size), after the overrides


RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    if recipe.name in RECIPES:
        raise ValueError(f"recipe {recipe.name!r} is registered twice")
    RECIPES[recipe.name] = recipe
    return recipe


def get(name: str) -> Recipe:
    import train.recipes  # noqa: F401  (registers the built-in recipes)

    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]
