"""Data parallel on 2 gloo processes under torchrun: DDP (with gradient accumulation) and FSDP2 end with
the parameters one process reaches on the same global batch; an FSDP2 run resumes from its checkpoint."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.train.util import ROOT, TINY, env, kfe, load_checkpoint
from train import checkpoint as ckpt
from train.recipes.supervised import build_model
from train.run import resolve_config

ARGS = ["train", "supervised", "--data", "shapes", *TINY, "--steps", "3", "--drop_path", "0", "--mixup", "0",
        "--cutmix", "0", "--ema", "false", "--eval_every", "0", "--lr", "5e-3", "--keep_ckpts", "0"]


def _torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "train.cli", *ARGS, *args]
    r = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("one"))
    r = kfe(*ARGS, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return ckpt.load(ckpt.path_for(out, 3))


def _assert_same_training(a, b):
    cfg, _ = resolve_config("supervised", overrides=ARGS[2:])
    torch.manual_seed(cfg.seed)                       # the trainer's initial weights
    init = build_model(cfg, num_classes=8).state_dict()
    for name, p in a["model"].items():
        # gradients agree to float rounding; Adam's normalisation can magnify that in tiny-gradient elements
        torch.testing.assert_close(b["model"][name], p, rtol=1e-4, atol=2e-5, msg=name)
    # the comparison means something only if training moved the weights well past that tolerance
    moved = [name for name, p in a["model"].items() if (p - init[name]).abs().max() > 1e-3]
    assert len(moved) > len(init) // 2


@pytest.mark.slow
def test_ddp_two_gloo_processes_with_accumulation_match_one_process(tmp_path, one_process):
    out = str(tmp_path / "ddp")
    r = _torchrun("--out", out, "--accum_steps", "2")
    assert "2 process(es) on cpu" in r.stdout and "(4 per process x 2 accumulation)" in r.stdout
    assert "Grad strides do not match" not in r.stderr
    two = ckpt.load(ckpt.path_for(out, 3))
    _assert_same_training(one_process, two)
    assert one_process["data"][0]["consumed"] == 3 and [d["consumed"] for d in two["data"]] == [6, 6]


@pytest.mark.slow
def test_fsdp2_matches_one_process_and_resumes(tmp_path, one_process):
    out = str(tmp_path / "fsdp")
    _torchrun("--out", out, "--dist", "fsdp", "--ckpt_every", "2")
    first = load_checkpoint(out, 3)                   # sharded (train/dcp.py), read whole
    _assert_same_training(one_process, first)        # full (unsharded) state dicts with the official keys
    shutil.rmtree(os.path.join(out, "ckpt-00000003.dcp"))  # as if killed after the step-2 checkpoint
    r = _torchrun("--out", out, "--dist", "fsdp", "--ckpt_every", "2", "--resume", "auto")
    assert "resuming at step 2" in r.stdout
    again = load_checkpoint(out, 3)
    for name, p in first["model"].items():
        assert torch.equal(again["model"][name], p), name
