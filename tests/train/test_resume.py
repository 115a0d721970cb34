"""Exact resume: a run SIGKILLed mid-training and resumed with --resume auto logs the same per-step
losses, learning rates and gradient norms as an uninterrupted run (bit-exact on the CPU)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.train.util import ROOT, TINY, env, kfe, metrics
from train import checkpoint as ckpt
from train.cli import main as kfe_main

STEPS = 8
# Data workers, drop path, random erasing and Mixup/CutMix all on: every source of randomness
# must resume exactly.
ARGS = ["train", "supervised", "--data", "shapes", *TINY, "--steps", str(STEPS), "--ckpt_every", "3",
        "--deterministic", "--num_workers", "1", "--drop_path", "0.1", "--mixup", "0.8", "--cutmix", "1.0",
        "--reprob", "0.25", "--randaug", "rand-m9-mstd0.5-inc1",
        "--ema", "--ema_decay", "0.9", "--keep_ckpts", "0"]


def _launch(out, *extra):
    return subprocess.Popen([sys.executable, "-m", "train.cli", *ARGS, "--out", out, *extra], env=env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(proc, out, step, timeout=180):
    path = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"run ended before step {step}:\n{proc.stdout.read()[-3000:]}")
        if os.path.exists(path) and any(f'"step": {step},' in line for line in open(path)):
            return
        time.sleep(0.05)
    pytest.fail(f"step {step} not reached in {timeout}s")


def _curve(out):
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in metrics(out)]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    reference = _launch(ref)
    killed = _launch(cut)
    _wait_for_step(killed, cut, 5)          # past the step-3 checkpoint, maybe in the middle of step 6's
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert reference.wait(timeout=240) == 0, reference.stdout.read()[-3000:]
    steps_before = [s for s, *_ in _curve(cut)]
    assert max(steps_before) >= 5 and max(steps_before) < STEPS
    resumed = kfe(*ARGS, "--out", cut, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming at step" in resumed.stdout
    expected = _curve(ref)
    assert [s for s, *_ in expected] == list(range(1, STEPS + 1))
    assert _curve(cut) == expected          # exact float equality, step by step
    assert metrics(cut, "eval") == metrics(ref, "eval")
    final_ref, final_cut = ckpt.load(ckpt.path_for(ref, STEPS)), ckpt.load(ckpt.path_for(cut, STEPS))
    for key in ("model", "ema"):
        for name, tensor in final_ref[key].items():
            assert torch.equal(tensor, final_cut[key][name]), (key, name)


def test_fresh_run_refuses_a_directory_with_checkpoints(tmp_path, capsys):
    out = str(tmp_path / "run")
    os.makedirs(out)
    ckpt.atomic_save({"format": ckpt.FORMAT_VERSION}, ckpt.path_for(out, 3))
    assert kfe_main([*ARGS[:2], "--out", out, "--data", "shapes", *TINY, "--steps", "1"]) == 2
    assert "already holds checkpoints: pass --resume auto" in capsys.readouterr().err


def test_atomic_save_leaves_old_checkpoint_when_interrupted(tmp_path, monkeypatch):
    path = ckpt.path_for(str(tmp_path), 1)
    ckpt.atomic_save({"format": ckpt.FORMAT_VERSION, "step": 1}, path)

    def crash(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # as if killed mid-write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_save({"format": ckpt.FORMAT_VERSION, "step": 2}, ckpt.path_for(str(tmp_path), 2))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000001.pt"]
    (tmp_path / ".ckpt-00000004.pt.tmp.123").write_bytes(b"left by a SIGKILL")
    (tmp_path / "ckpt-00000003.pt").write_bytes(b"garbage")  # unreadable: skipped by --resume auto
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        assert ckpt.find_resume(str(tmp_path), "auto") == path
    ckpt.remove_stale_temporaries(str(tmp_path))
    assert ".ckpt-00000004.pt.tmp.123" not in os.listdir(tmp_path)


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "train.cli", "train", "supervised", "--data", "shapes", *TINY,
                             "--steps", "500", "--out", out], env=env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for_step(proc, out, 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    text = proc.stdout.read()
    assert "stopped by SIGTERM at step" in text and "continue with --resume auto" in text
    (step, path), = ckpt.list_checkpoints(out)
    assert 2 <= step < 500 and ckpt.load(path)["step"] == step


def test_sigterm_while_waiting_for_data_stops_at_once_with_an_exact_checkpoint(tmp_path):
    """A SIGTERM that lands while the loader is busy (here: inside a sample's decode) stops the run there;
    the steps done are checkpointed, and resuming gives the uninterrupted run's losses."""
    from train.data.loader import Transformed
    from train.run import resolve_config, train

    over = ["--data", "shapes", *TINY, "--steps", "4", "--shapes.size", "64", "--ckpt_every", "100"]
    ref = train("supervised", resolve_config("supervised", overrides=over + ["--out", str(tmp_path / "ref")])[0])
    out = str(tmp_path / "run")
    cfg = resolve_config("supervised", overrides=over + ["--out", out])[0]
    calls, getitem = [0], Transformed.__getitem__

    def getitem_then_sigterm(self, key):
        calls[0] += 1
        if calls[0] == 2 * 16 + 3:  # the 4th sample of step 2's batch (batch 16, steps 0 and 1 done)
            os.kill(os.getpid(), signal.SIGTERM)
        return getitem(self, key)

    before = signal.getsignal(signal.SIGTERM)
    try:
        Transformed.__getitem__ = getitem_then_sigterm
        summary = train("supervised", cfg)
    finally:
        Transformed.__getitem__ = getitem
        signal.signal(signal.SIGTERM, before)
    assert summary["step"] == 2 and summary["checkpoint"].endswith("ckpt-00000002.pt")
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]
    cfg.resume = "auto"
    train("supervised", cfg)
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(ref["run_dir"])]
