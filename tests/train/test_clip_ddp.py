"""Distributed CLIP: 2 gloo processes under torchrun (kfe::contrastive_loss all-gathers the features, each
process scores its own rows) end with the parameters one process reaches on the same global batch, under
DDP and under FSDP2 (whose scalar logit_scale stays replicated, see train/wrap.py; with an evaluation
mid-run, which calls the text tower outside the root forward)."""
import subprocess
import sys

import pytest
import torch

from tests.train.clip_util import TINY
from tests.train.util import ROOT, env, kfe, load_checkpoint
from train import checkpoint as ckpt
from train.data import tokenizer as tok_mod
from train.recipes.image_text import build_model
from train.run import resolve_config

ARGS = ["train", "clip", "--data", "shapes", *TINY, "--steps", "3", "--lr", "5e-3", "--eval_every", "0",
        "--keep_ckpts", "0"]


@pytest.mark.slow
@pytest.mark.parametrize("dist", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path, dist):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train.cli",
           *ARGS, "--out", two, "--dist", dist] + (["--eval_every", "2", "--shapes.val_size", "64"] if dist == "fsdp" else [])
    ddp = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    single = kfe(*ARGS, "--out", one)
    out, err = ddp.communicate(timeout=240)
    assert single.returncode == 0, single.stderr[-3000:]
    assert ddp.returncode == 0, out[-3000:] + err[-3000:]
    assert "2 process(es) on cpu" in out and "(8 per process x 1 accumulation)" in out
    a, b = ckpt.load(ckpt.path_for(one, 3)), load_checkpoint(two, 3)  # fsdp: sharded, read whole
    cfg, _ = resolve_config("clip", overrides=ARGS[2:])
    torch.manual_seed(cfg.seed)                                   # the trainer's initial weights
    init = build_model(cfg, tok_mod.from_dict(a["task"][0]["tokenizer"])).state_dict()
    for name, p in a["model"].items():
        q = b["model"][name]
        if name.endswith(("attn.qkv.bias", "attn.in_proj_bias")):
            # the key bias cancels in the softmax: its gradient is exactly 0 in exact arithmetic, so both
            # runs step it by Adam-normalised rounding noise. Compare the query and value thirds.
            p, q = p.view(3, -1)[[0, 2]], q.view(3, -1)[[0, 2]]
        # float rounding of the gathered / reduced sums; Adam can magnify it in tiny-gradient elements
        torch.testing.assert_close(q, p, rtol=1e-4, atol=2e-5, msg=name)
    moved = [n for n, p in a["model"].items() if (p - init[n]).abs().max() > 1e-3]
    assert len(moved) > len(init) // 2 and "logit_scale" in moved
    assert [d["consumed"] for d in b["data"]] == [3, 3] and b["task"][0] == b["task"][1] == a["task"][0]
