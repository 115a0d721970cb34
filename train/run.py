"""Entry points behind `kfe train`, `kfe eval` and `kfe export` (usable from Python too).

    from train.run import resolve_config, train
    cfg, preset = resolve_config("supervised", overrides=["--steps", "50"])
    summary = train("supervised", cfg)
"""
from __future__ import annotations

import gc
import os

import torch

from train import checkpoint as ckpt_mod
from train import config as config_mod
from train import dist as dist_mod
from train.data import eval_batches, kind_of, open_eval
from train.eval import features, knn_top1, linear_probe, percent
from train.recipes.base import get
from train.trainer import Trainer, model_errors, prepare_batch, read_checkpoint, to_channels_last


def resolve_config(recipe_name: str, config_file: str | None = None, preset: str = "auto",
                   overrides: list[str] | None = None):
    """Defaults -> preset -> TOML -> overrides. preset "auto" picks the recipe's `shapes` preset when the
    data (after the TOML file and overrides) is shapes, else the preset named after the model when the
    recipe has one (clip's metaclip_vit_*), else "paper" (the dataclass defaults)."""
    recipe = get(recipe_name)
    toml = config_mod.load_toml(config_file) if config_file else None
    over = config_mod.parse_overrides(recipe.config, overrides or [])
    if preset in ("", "auto"):
        data = config_mod.merged_get("data", {"data": recipe.config().data}, toml, over)
        model = config_mod.merged_get("model", {"model": getattr(recipe.config(), "model", "")}, toml, over)
        preset = "shapes" if kind_of(data) == "shapes" and "shapes" in recipe.presets else "paper"
        if preset == "paper" and model in recipe.presets:  # e.g. clip's per-size metaclip_vit_* presets
            preset = model
        preset = data if data in recipe.presets else preset  # a preset named after built-in data (shapes-parts)
    if preset == "paper":
        mapping = None
    elif preset in recipe.presets:
        mapping = recipe.presets[preset]
    else:
        raise config_mod.ConfigError(f"unknown preset {preset!r} for {recipe_name}; choose paper, "
                                     + ", ".join(recipe.presets))
    cfg = config_mod.resolve(recipe.config, mapping, toml, over)
    if recipe.resolve is not None:
        recipe.resolve(cfg)
    return cfg, preset


def train(recipe_name: str, cfg, preset: str = "paper") -> dict:
    """Run (or resume) one training job; returns the summary record."""
    from train.loop import run_loop

    recipe = get(recipe_name)
    trainer = Trainer(recipe, cfg)
    info = trainer.info
    text = config_mod.to_toml(config_mod.to_sections(cfg))
    if info.main:
        print(f"kfe train {recipe_name} | preset {preset} | {info.world} process(es) on {trainer.device.type} | "
              f"run dir {trainer.run_dir}", flush=True)
        print("# resolved config\n" + text, flush=True)
    try:
        trainer.setup()
        if info.main:
            os.makedirs(trainer.run_dir, exist_ok=True)  # only now: a run that fails its checks leaves nothing
            text = config_mod.to_toml(config_mod.to_sections(cfg))  # as setup resolved it (dit's latent_scale)
            with open(os.path.join(trainer.run_dir, "config.toml"), "w") as f:
                f.write(f"# kfe train {recipe_name} (preset {preset}); rerun with --config this-file\n" + text)
            for name, content in trainer.task.run_files.items():
                with open(os.path.join(trainer.run_dir, name), "w") as f:
                    f.write(content)
            start = f"resuming at step {trainer.start_step}" if trainer.start_step else "starting"
            print(f"{start}: {trainer.total_steps} steps of {cfg.batch_size} images "
                  f"({trainer.local_batch} per process x {cfg.accum_steps} accumulation), lr {trainer.lr:.3g}, "
                  f"warmup {trainer.warmup} | {trainer.threads_note}", flush=True)
        return run_loop(trainer)
    finally:
        # The model (FSDP's device mesh, DDP's reducer) holds the process group: drop it first, so the
        # group's threads end inside destroy_process_group, not during interpreter teardown.
        del trainer
        gc.collect()
        dist_mod.shutdown()


def _checkpoint_path(path: str) -> str:
    if os.path.isdir(path) and not os.path.normpath(path).endswith(".dcp"):  # a run directory
        found = ckpt_mod.find_resume(path, "auto")
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {path!r}")
        return found
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such checkpoint {path!r}")
    return path


def _with_model(ckpt: dict) -> dict:
    """A sharded (.dcp) checkpoint's full model state, read from its shards."""
    if "dcp" in ckpt:
        from train import dcp

        ckpt["model"] = dcp.full_model_state(ckpt["dcp"])
    return ckpt


def load_for_eval(path: str, overrides: list[str] | None = None, ema: bool = False):
    """(recipe, cfg, data, task, module on its device, prepare) rebuilt from a checkpoint."""
    ckpt = _with_model(read_checkpoint(_checkpoint_path(path)))
    recipe = get(ckpt["recipe"])
    cfg = config_mod.from_dict(recipe.config, ckpt["config"])
    if getattr(cfg, "init", ""):  # fine-tuned runs: the weights come from this checkpoint, not the --init file
        cfg.init = ""
    config_mod.apply_mapping(cfg, config_mod.parse_overrides(recipe.config, overrides or []), "command line")
    info = dist_mod.init(cfg.device)
    data = recipe.build_data(cfg, info)
    with model_errors(cfg):
        task = recipe.build_task(cfg, data, info)
    if ema and ckpt.get("ema") is None:
        raise ValueError(f"{path} has no EMA weights")
    if task.load_state_dict is not None and ckpt.get("task"):
        task.load_state_dict(ckpt["task"][0])
    module = task.model
    module.load_state_dict(ckpt["ema"] if ema else ckpt["model"])
    channels_last = task.channels_last and cfg.channels_last
    module = module.to(info.device)
    if channels_last:
        to_channels_last(module)
    module.eval()

    def prepare(batch):
        return prepare_batch(batch, info.device, channels_last, task)

    return recipe, cfg, data, task, module, prepare, info, ckpt["step"]


def evaluate_checkpoint(path: str, probe: str = "top1", ema: bool = False, overrides: list[str] | None = None,
                        probe_samples: int = 5000) -> dict:
    """Held-out metrics of a checkpoint: the recipe's own evaluation (top-1), or a k-NN / linear probe on
    `task.embed` features of `probe_samples` training images."""
    recipe, cfg, data, task, module, prepare, info, step = load_for_eval(path, overrides, ema)
    with torch.no_grad():
        if probe == "top1":
            if task.evaluate is None or data.val is None:
                raise ValueError(f"recipe {recipe.name} has no held-out top-1 for {cfg.data!r}")
            metrics = task.evaluate(module, prepare)
            line = task.describe(metrics) if task.describe else str(metrics)
        else:
            if task.embed is None:
                raise ValueError(f"recipe {recipe.name} defines no features (task.embed) to probe")
            fields = data.fields
            tr = open_eval(cfg.data, resolution=cfg.resolution, fields=fields, seed=cfg.seed, rank=info.rank,
                           world=info.world, shapes=cfg.shapes, split="train")
            if tr is None or data.val is None:
                raise ValueError(f"a probe needs a train and a held-out split of {cfg.data!r}")
            n_cls = len(data.class_names) if data.class_names else getattr(cfg, "num_classes", 0)
            embed = (lambda b: task.embed(module, b))
            kw = dict(batch=cfg.eval_batch_size, rank=info.rank, world=info.world, num_workers=0)
            xtr, ytr = features(embed, eval_batches(tr.dataset, limit=probe_samples, **kw), prepare, info)
            xte, yte = features(embed, eval_batches(data.val.dataset, **kw), prepare, info)
            from train.eval import chance

            acc = (knn_top1(xtr, ytr, xte, yte, n_cls) if probe == "knn"
                   else linear_probe(xtr, ytr, xte, yte, n_cls))
            metrics = {f"{probe}_top1": acc, "chance": chance(yte, n_cls), "n": int(yte.numel()),
                       "train_n": int(ytr.numel())}
            line = (f"held-out {probe} top-1 {percent(acc)} (chance {percent(metrics['chance'])}, "
                    f"{metrics['n']} images, {metrics['train_n']} training features)")
    if info.main:
        print(f"{path} (step {step}{', EMA' if ema else ''}): {line}", flush=True)
    dist_mod.shutdown()
    return metrics


def export_checkpoint(path: str, out: str, ema: bool = False) -> dict:
    ckpt = _with_model(read_checkpoint(_checkpoint_path(path)))
    from train.metrics import naming

    with naming(out):
        sd = ckpt_mod.export(ckpt, out, ema, get(ckpt["recipe"]).export)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(out, 0o666 & ~umask)  # safetensors writes 0600; an exported file is meant to be shared
    print(f"wrote {len(sd)} tensors ({sum(v.numel() for v in sd.values()) / 1e6:.2f}M values) to {out}")
    return sd
