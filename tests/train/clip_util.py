"""Tiny image-text settings shared by the clip / slip / cit tests."""
import json

import torch

from train.run import resolve_config, train

MODEL = {"vision": {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8}, "embed_dim": 32,
         "transformer_width": 32, "transformer_layers": 1, "transformer_heads": 2}
TINY = ["--resolution", "32", "--model_kwargs", json.dumps(MODEL), "--batch_size", "16", "--num_workers", "0",
        "--progress", "false", "--shapes.val_size", "64", "--eval_batch_size", "64", "--warmup_steps", "2",
        "--log_every", "1", "--vocab_samples", "400", "--threads", "1"]


def run(recipe, out, *extra):
    """Train in this process (the trainer's --threads 1 is undone afterwards)."""
    threads = torch.get_num_threads()
    cfg, preset = resolve_config(recipe, overrides=["--data", "shapes", *TINY, "--out", str(out), *extra])
    try:
        return cfg, train(recipe, cfg, preset)
    finally:
        torch.set_num_threads(threads)


def falls(losses, factor=0.75):
    return sum(losses[-3:]) / 3 < factor * sum(losses[:3]) / 3
