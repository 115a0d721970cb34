"""DDP: 2 gloo processes under torchrun (with gradient accumulation) end with the parameters one process
reaches on the same global batch."""
import subprocess
import sys

import pytest
import torch

from tests.train.util import ROOT, TINY, env, kfe
from train import checkpoint as ckpt
from train.recipes.supervised import build_model
from train.run import resolve_config

ARGS = ["train", "supervised", "--data", "shapes", *TINY, "--steps", "3", "--drop_path", "0", "--mixup", "0",
        "--cutmix", "0", "--ema", "false", "--eval_every", "0", "--lr", "5e-3"]


@pytest.mark.slow
def test_two_gloo_processes_with_accumulation_match_one_process(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    r = kfe(*ARGS, "--out", one)
    assert r.returncode == 0, r.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "train.cli", *ARGS, "--out", two, "--accum_steps", "2"]
    r = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 process(es) on cpu" in r.stdout and "(4 per process x 2 accumulation)" in r.stdout
    assert "Grad strides do not match" not in r.stderr
    a, b = ckpt.load(ckpt.path_for(one, 3)), ckpt.load(ckpt.path_for(two, 3))
    cfg, _ = resolve_config("supervised", overrides=ARGS[2:])
    torch.manual_seed(cfg.seed)                       # the trainer's initial weights
    init = build_model(cfg, num_classes=8).state_dict()
    for name, p in a["model"].items():
        torch.testing.assert_close(b["model"][name], p, rtol=1e-4, atol=2e-5, msg=name)  # Adam turns float noise into ~lr-sized steps
    # the comparison means something only if training moved the weights well past that tolerance
    moved = [name for name, p in a["model"].items() if (p - init[name]).abs().max() > 1e-3]
    assert len(moved) > len(init) // 2
    assert a["data"][0]["consumed"] == 3 and [d["consumed"] for d in b["data"]] == [6, 6]
