"""The shared training loop every recipe runs (see train/recipes/base.py for the recipe contract).

One optimizer step = `accum_steps` micro-batches of batch_size / (world * accum_steps) samples per
process; DDP synchronises gradients on the last micro-batch only. Order of events per step:
forward/backward (bf16 autocast on GPU) -> grad-norm clip -> AdamW -> lr schedule -> EMA -> log ->
eval -> checkpoint. Everything that decides the next step (weights, optimizer, schedule, EMA, RNG
states, data position) is in the checkpoint, so a killed run resumes on the same loss curve.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import time
import warnings

import torch
from torch import nn

from train import checkpoint as ckpt_mod
from train import config as config_mod
from train import dist as dist_mod
from train import dcp as dcp_mod
from train import threads as threads_mod
from train.data import Loader, kind_of, normalize
from train.data import loader as loader_mod
from train.data.loader import StopRequested
from train.metrics import SKIPPED_KEYS, Reporter, memory_gb, naming, peak_flops
from train.optim import EMA, adamw, param_groups, scheduler
from train.recipes.base import Recipe, TrainConfig
from train.wrap import load_wrapped_state, unsharded, wrap_model


def default_run_dir(recipe: str, cfg: TrainConfig) -> str:
    if cfg.out:
        return cfg.out
    tag = "shapes" if kind_of(cfg.data) == "shapes" else os.path.basename(
        os.path.normpath(cfg.data.split("{")[0])) or "data"
    return os.path.join("runs", f"{recipe}-{tag}")


def check_config(cfg: TrainConfig, world: int) -> None:
    """Value checks the type system cannot express (raised before anything is built)."""
    err = config_mod.ConfigError
    if cfg.batch_size <= 0 or cfg.accum_steps <= 0:
        raise err(f"batch_size and accum_steps must be positive, got {cfg.batch_size}, {cfg.accum_steps}")
    if cfg.batch_size % (world * cfg.accum_steps):
        raise err(f"batch_size {cfg.batch_size} must divide evenly over {world} process(es) x "
                  f"accum_steps {cfg.accum_steps}")
    if cfg.steps < 0 or cfg.epochs <= 0 and cfg.steps == 0:
        raise err("give a positive steps or epochs")
    if cfg.resolution < 16:
        raise err(f"resolution must be >= 16, got {cfg.resolution}")
    if cfg.dist == "fsdp" and cfg.ema:
        raise err("ema is not supported with dist = fsdp (the EMA copy would be unsharded); use ddp")
    for name in ("log_every", "ckpt_every"):
        if getattr(cfg, name) <= 0:
            raise err(f"{name} must be positive, got {getattr(cfg, name)}")
    for name, zero in (("num_workers", "load in the training process"), ("eval_every", "evaluate at the end only")):
        if getattr(cfg, name) < 0:
            raise err(f"{name} must be >= 0 (0 = {zero}), got {getattr(cfg, name)}")


def to_channels_last(module: nn.Module) -> nn.Module:
    """Conv weights to channels-last (only those: 4-D parameters of other layers, like GRN's (1, 1, 1, C)
    gamma, would get strides their gradients do not have, which DDP's buckets warn about)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.to(memory_format=torch.channels_last)
    return module


def prepare_batch(batch: dict, device: torch.device, channels_last: bool, task) -> dict:
    """A loader batch on the device: images float and normalised (channels-last if asked), labels long.
    Floating-point "images" (pre-computed latents, train/data/latents.py) are moved as they are."""
    out = dict(batch)
    if batch["image"].is_floating_point():
        out["image"] = batch["image"].to(device, torch.float32, non_blocking=True)
    else:
        out["image"] = normalize(batch["image"], device, channels_last, task.mean, task.std)
    if "label" in batch:
        out["label"] = batch["label"].to(device, non_blocking=True)
    return out


class Trainer:
    def __init__(self, recipe: Recipe, cfg: TrainConfig, run_dir: str | None = None):
        self.recipe, self.cfg = recipe, cfg
        self.info = dist_mod.init(cfg.device)
        check_config(cfg, self.info.world)
        self.device = self.info.device
        self.run_dir = run_dir or default_run_dir(recipe.name, cfg)
        self.stop = False
        self.saver = None  # sharded checkpoints (train/dcp.py), made at the first save
        self.interruptible = False  # waiting for the first micro-batch of a step, on one process

    # ------------------------------------------------------------ setup

    def setup(self, checkpoints: bool = True) -> None:
        cfg, info = self.cfg, self.info
        self.threads_note = threads_mod.apply(cfg.threads, kind_of(cfg.data) == "shapes")
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        # The data first: a bad path fails before the model is built or anything is written (the run
        # directory is created by run.train once setup has passed every check).
        self.data = self.recipe.build_data(cfg, info)
        resume = self._find_resume() if checkpoints else None
        self.local_batch = cfg.batch_size // (info.world * cfg.accum_steps)
        self.loader = Loader(self.data.train.dataset, self.local_batch, info.rank, info.world, cfg.seed,
                             cfg.num_workers, pin_memory=self.device.type == "cuda")
        self.loader.should_stop = lambda: self.stop
        self.total_steps, self.warmup = self._lengths()
        ckpt_mod.seed_all(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
        with model_errors(cfg):
            self.task = self.recipe.build_task(cfg, self.data, info)
        self.module = self.task.model.to(self.device)
        self.channels_last = self.task.channels_last and cfg.channels_last
        self.sharded = cfg.dist == "fsdp" and info.world > 1
        if self.channels_last and not self.sharded:  # FSDP2 cannot shard non-contiguous parameters
            to_channels_last(self.module)
        state = read_checkpoint(resume) if resume else None
        if state is not None:
            self._restore_task(state)
        if state is not None and not self.sharded and "dcp" not in state:
            self.module.load_state_dict(state["model"])
        self.ema = EMA(self.module, cfg.ema_decay, cfg.ema_warmup) if cfg.ema else None
        self.model = wrap_model(self.module, cfg, info, self.task.shard_units)
        if state is not None and self.sharded and "dcp" not in state:
            load_wrapped_state(self.module, state["model"], info)
        self.train_model = torch.compile(self.model) if cfg.compile else self.model
        self.lr = cfg.lr if cfg.lr > 0 else cfg.blr * cfg.batch_size / 256
        groups = (self.task.param_groups or (lambda m: param_groups(m, cfg.weight_decay)))(self.module)
        self.optimizer = (self.task.optimizer or adamw)(groups, self.lr, cfg.betas, self.device)
        self.scheduler = scheduler(self.optimizer, self.total_steps, self.warmup, self.lr, cfg.min_lr)
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.start_step = 0
        ckpt_mod.seed_all(cfg.seed + info.rank)  # per-rank randomness (drop path) from here on
        if state is not None:
            self._restore(state, resume)

    def _find_resume(self) -> str | None:
        """Rank 0 looks in the run directory; every rank gets its answer (or its error: no rank hangs)."""
        cfg, info = self.cfg, self.info
        path, error = None, None
        if info.main:
            if os.path.isdir(self.run_dir):
                ckpt_mod.remove_stale_temporaries(self.run_dir)
                dcp_mod.remove_stale(self.run_dir)
            try:
                path = ckpt_mod.find_resume(self.run_dir, cfg.resume)
            except FileNotFoundError as err:
                error = str(err)
            found = ckpt_mod.list_checkpoints(self.run_dir)
            if not cfg.resume and found:
                error = (f"{self.run_dir} already holds checkpoints: pass --resume auto to continue that run, "
                         "or --out DIR for a new one")
            elif path is not None and os.path.isdir(path) and cfg.resume != "auto":
                try:
                    dcp_mod.check_own(path, self.run_dir)
                except ValueError as err:
                    error = str(err)
            elif cfg.resume == "auto" and path is None and found:  # never start over and overwrite them
                error = (f"--resume auto: none of the {len(found)} checkpoint(s) in {self.run_dir} is readable "
                         f"(newest: {found[-1][1]}); move them away to start afresh, or resume from a file "
                         "with --resume PATH")
        path, error = dist_mod.broadcast_object((path, error), info)
        if error:
            raise config_mod.ConfigError(error)
        return path

    def _lengths(self) -> tuple[int, int]:
        cfg = self.cfg
        size = self.data.train.size or cfg.samples_per_epoch
        if cfg.steps > 0:
            total = cfg.steps
        elif size:
            total = max(1, math.ceil(cfg.epochs * size / cfg.batch_size))
        else:
            raise config_mod.ConfigError("a WebDataset stream has no length: give --steps N or "
                                         "--samples_per_epoch N (with --epochs)")
        per_epoch = size / cfg.batch_size if size else None
        if cfg.warmup_steps >= 0:
            warmup = cfg.warmup_steps
        else:
            warmup = round(cfg.warmup_epochs * per_epoch) if per_epoch else 0
            if not per_epoch and cfg.warmup_epochs > 0 and self.info.main:  # (setup runs once: warned once)
                warnings.warn(f"warmup_epochs = {cfg.warmup_epochs} is ignored: a stream has no epoch length; "
                              "give --warmup_steps N or --samples_per_epoch N (training runs without warmup)")
        return total, min(warmup, total)

    def _restore_task(self, state: dict) -> None:
        """The recipe's own state (before the weights: a mismatch there is the clearer error)."""
        saved = state.get("task")
        if self.task.load_state_dict is None or saved is None:
            return
        if len(saved) != self.info.world:
            warnings.warn(f"checkpoint written by {len(saved)} process(es), resumed on {self.info.world}: "
                          "the recipe's per-process state restarts")
            return
        self.task.load_state_dict(saved[self.info.rank])

    def batches(self):
        """The training batches: the loader's, or what the recipe makes of them (task.batches)."""
        if self.task.batches is not None:
            return self.task.batches(self.loader, self.module)
        return iter(self.loader)

    def _restore(self, state: dict, path: str) -> None:
        info, saved = self.info, state["config"]
        diff = sorted(k for k, v in config_mod.to_dict(self.cfg).items()
                      if k in saved and saved[k] != v and k not in ("resume", "progress", "out"))
        if diff:
            warnings.warn(f"resuming {path} with changed config keys {diff}: the run will not match an "
                          "uninterrupted one exactly")
        if "dcp" in state:  # sharded: model and optimizer from the shards, in this run's layout
            dcp_mod.load_into(state["dcp"], self.module, self.optimizer)
        elif self.sharded:
            from train.wrap import load_optimizer_state
            load_optimizer_state(self.module, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            if state.get("ema") is None:
                warnings.warn("the checkpoint has no EMA weights; starting the EMA from the current weights")
            else:
                self.ema.load_state_dict(state["ema"])
        same_world = len(state["data"]) == info.world
        self.loader.load_state_dict(state["data"][info.rank if same_world else 0])
        if same_world:
            ckpt_mod.set_rng_state(state["rng"][info.rank])
        else:
            warnings.warn(f"checkpoint written by {len(state['data'])} process(es), resumed on {info.world}: "
                          "RNG streams restart")
        self.start_step = state["step"]

    # ------------------------------------------------------------ one step

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _no_sync(self, skip_sync: bool):
        if not skip_sync or self.info.world == 1:
            return contextlib.nullcontext()
        if hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return _fsdp_no_sync(self.model)

    def prepare(self, batch: dict) -> dict:
        return prepare_batch(batch, self.device, self.channels_last, self.task)

    def _next_batch(self, batches, first: bool) -> dict:
        """next(batches), stoppable: a SIGTERM that arrives while one process waits for the first micro-batch
        of a step stops it at once (bad data being skipped could keep it waiting for a whole pass, and the
        stop flag is read only at log steps). Nothing of the step is done yet, so the steps so far can be
        checkpointed exactly; later micro-batches, or DDP (the other ranks may sit in a collective), are
        stopped only by the loader, when it skips an empty batch, without a checkpoint."""
        safe = first and self.info.world == 1 and self.task.batches is None  # (CiT: its own state)
        self.interruptible = safe
        try:
            return next(batches)
        except StopRequested as stop:
            stop.checkpoint = safe
            raise
        finally:
            self.interruptible = False

    def step(self, batches, step: int) -> dict:
        """One optimizer step over `accum_steps` micro-batches drawn from the iterator `batches`."""
        accum = self.cfg.accum_steps
        loss_sum, images, data_time = torch.zeros((), device=self.device), 0, 0.0
        for micro in range(accum):
            t0 = time.perf_counter()
            batch = self._next_batch(batches, first=micro == 0)
            data_time += time.perf_counter() - t0
            batch = self.prepare(batch)
            with self._no_sync(micro < accum - 1):
                with self._autocast():
                    loss, _ = self.task.loss(self.train_model, batch, step)
                (loss / accum).backward()
            loss_sum += loss.detach().float()
            images += batch["image"].shape[0]
        max_norm = self.cfg.clip_grad if self.cfg.clip_grad > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor norm over the shards
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.module, step + 1)
        return {"loss": loss_sum / accum, "grad_norm": grad_norm.detach().float(), "images": images,
                "data_time": data_time}

    # ------------------------------------------------------------ evaluation and checkpoints

    def evaluate(self, step: int) -> dict:
        if self.task.evaluate is None:
            return {}
        self.module.eval()
        loader_mod.HELD_OUT_SKIPPED.clear()  # the summary reports the newest evaluation's skips
        with torch.no_grad(), self._autocast(), unsharded(self.module, self.sharded):
            metrics = dict(self.task.evaluate(self.module, self.prepare))
            held = dict(loader_mod.HELD_OUT_SKIPPED)
            if self.ema is not None:  # (reads the same held-out samples again: not counted twice)
                metrics.update({f"ema_{k}": v for k, v in self.task.evaluate(self.ema.module, self.prepare).items()
                                if not k.startswith("chance")})
            loader_mod.HELD_OUT_SKIPPED.clear()
            loader_mod.HELD_OUT_SKIPPED.update(held)
        self.module.train()
        return metrics

    def save(self, step: int) -> str:
        from train.wrap import optimizer_state

        info = self.info
        rng = dist_mod.all_gather_objects(ckpt_mod.rng_state(), info)
        data = dist_mod.all_gather_objects(self.loader.state_dict(), info)
        task = dist_mod.all_gather_objects(self.task.state_dict(), info) if self.task.state_dict else None
        if self.sharded:  # each rank writes its shards (train/dcp.py); nothing is gathered
            meta = {"format": ckpt_mod.FORMAT_VERSION, "recipe": self.recipe.name, "step": step,
                    "config": config_mod.to_dict(self.cfg), "scheduler": self.scheduler.state_dict(), "ema": None,
                    "rng": rng, "data": data, "world": info.world, "task": task}
            if self.saver is None:
                self.saver = dcp_mod.Saver(info, self.cfg.async_ckpt)
            prune = (lambda: ckpt_mod.prune(self.run_dir, self.cfg.keep_ckpts)) if info.main else None
            return self.saver.save(self.run_dir, step, self.module, self.optimizer, meta, prune)
        model_sd = self.module.state_dict()
        opt_sd = optimizer_state(self.module, self.optimizer, "ddp")
        path = ckpt_mod.path_for(self.run_dir, step)
        if info.main:
            with naming(path):
                ckpt_mod.atomic_save({
                    "format": ckpt_mod.FORMAT_VERSION, "recipe": self.recipe.name, "step": step,
                    "config": config_mod.to_dict(self.cfg), "model": model_sd, "optimizer": opt_sd,
                    "scheduler": self.scheduler.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                    "rng": rng, "data": data, "world": info.world, "task": task,
                }, path)
            ckpt_mod.prune(self.run_dir, self.cfg.keep_ckpts)
        dist_mod.barrier(info)
        return path

    # ------------------------------------------------------------ the loop

    def finish_saves(self) -> None:
        """Commit a checkpoint still being written in the background (--async_ckpt)."""
        if self.saver is not None:
            self.saver.wait()

    def skipped_total(self) -> dict:
        """Training skips by reason, plus `held_out_<reason>` for the newest evaluation's, over all processes."""
        held = loader_mod.HELD_OUT_SKIPPED
        counts = torch.tensor([float(self.loader.skipped.get(k, 0)) for k in SKIPPED_KEYS]
                              + [float(held.get(k, 0)) for k in SKIPPED_KEYS], device=self.device)
        dist_mod.all_reduce_sum(counts, self.info)
        names = list(SKIPPED_KEYS) + [f"held_out_{k}" for k in SKIPPED_KEYS]
        return {k: int(v) for k, v in zip(names, counts.tolist()) if v}

    def fit(self) -> dict:
        from train.loop import run_loop

        return run_loop(self)

    def request_stop(self, *_):
        self.stop = True
        if self.interruptible:  # see _next_batch
            self.interruptible = False
            raise StopRequested("SIGTERM while waiting for data")

    def install_signal_handlers(self):
        """SIGTERM -> request_stop; returns a function that puts the previous handler back."""
        try:
            before = signal.signal(signal.SIGTERM, self.request_stop)
        except ValueError:  # not the main thread (e.g. under a test runner thread)
            return lambda: None
        return lambda: signal.signal(signal.SIGTERM, before)

    def flops(self) -> tuple[float | None, float | None]:
        return self.task.flops_per_sample, peak_flops(self.device)

    def memory(self) -> float:
        return memory_gb(self.device)

    def reporter(self) -> Reporter:
        cfg = self.cfg
        return Reporter(self.run_dir, self.info.main, self.total_steps, self.start_step, cfg.progress,
                        cfg.tensorboard)


def read_checkpoint(path: str) -> dict:
    """ckpt_mod.load with a one-line error naming the file (a truncated or foreign file raises deep in torch)."""
    try:
        return ckpt_mod.load(path)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - zip, pickle, EOF, I/O errors: all mean "cannot read this file"
        first = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"cannot read checkpoint {path}: {type(err).__name__}: {first}") from None


@contextlib.contextmanager
def model_errors(cfg):
    """An unknown --model or a --model_kwargs key its constructor does not take: a ConfigError naming it."""
    try:
        yield
    except ValueError as err:
        if str(err).startswith("unknown model"):
            raise config_mod.ConfigError(f"--model: {err}") from None
        raise
    except TypeError as err:
        text = str(err)
        if "unexpected keyword argument" in text or "multiple values for" in text:
            raise config_mod.ConfigError(f"--model_kwargs {cfg.model_kwargs}: {text} (model {cfg.model})") from None
        raise


def _fsdp_no_sync(model: nn.Module):
    @contextlib.contextmanager
    def ctx():
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    return ctx()
