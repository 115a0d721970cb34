"""Helpers for the training tests: tiny configs, subprocess launches, WebDataset shards on disk."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A ConvNeXt V2 with one block per stage and 8..64 channels on 32 px shapes: ~0.1 s per step here.
TINY = ["--resolution", "32", "--model_kwargs", '{"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}',
        "--batch_size", "16", "--num_workers", "0", "--progress", "false", "--shapes.val_size", "64",
        "--eval_batch_size", "64", "--warmup_steps", "2", "--log_every", "1"]


def env(**extra) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    e.update(extra)
    return e


def kfe(*args: str, timeout: float = 240, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.cli", *args], env=env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, **popen)


def metrics(run_dir: str, kind: str = "train") -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def load_checkpoint(run_dir: str, step: int) -> dict:
    """The step's checkpoint with its full model state: a .pt file, or an FSDP2 run's sharded .dcp."""
    from train import checkpoint, dcp
    from train.run import _with_model

    path = dcp.path_for(run_dir, step)
    return _with_model(checkpoint.load(path if os.path.isdir(path) else checkpoint.path_for(run_dir, step)))


def jpeg(value: int, size=(20, 24)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((*size, 3), value % 255, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_shards(directory: str, shards: int, per_shard: int, corrupt=(), no_caption=(), label=False) -> list[str]:
    """img2dataset-style shards written with webdataset's TarWriter; returns the keys of good samples.

    corrupt / no_caption: (shard, member) pairs given an undecodable .jpg / no .txt.
    """
    import webdataset as wds

    os.makedirs(directory, exist_ok=True)
    good = []
    for s in range(shards):
        with wds.TarWriter(os.path.join(directory, f"{s:05d}.tar")) as w:
            for k in range(per_shard):
                key = f"{s:05d}{k:04d}"
                sample = {"__key__": key, "jpg": jpeg(s * per_shard + k), "txt": f"a photo number {key}",
                          "json": json.dumps({"key": key}).encode()}
                if label:
                    sample["cls"] = str((s + k) % 3).encode()
                if (s, k) in corrupt:
                    sample["jpg"] = b"\xff\xd8 this is not a jpeg"
                if (s, k) in no_caption:
                    del sample["txt"]
                w.write(sample)
                if (s, k) not in corrupt and (s, k) not in no_caption:
                    good.append(key)
    return good


def built_trainer(recipe: str, out, *overrides: str, preset: str = "auto"):
    """A Trainer set up for `recipe` (data, model, optimizer, schedule built; no checkpoints, no step)."""
    import torch

    from train.recipes import get
    from train.run import resolve_config
    from train.trainer import Trainer

    cfg, _ = resolve_config(recipe, overrides=[*overrides, "--out", str(out)], preset=preset)
    threads = torch.get_num_threads()
    try:
        t = Trainer(get(recipe), cfg)
        t.setup(checkpoints=False)
    finally:
        torch.set_num_threads(threads)
    return t


def group_names(trainer) -> list[tuple[float, set[str]]]:
    """The optimizer's groups as (weight decay, parameter names)."""
    names = {id(p): n for n, p in trainer.module.named_parameters()}
    return [(g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in trainer.optimizer.param_groups]
