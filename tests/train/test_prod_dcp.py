"""Sharded FSDP2 checkpoints (torch.distributed.checkpoint): a 2-process gloo run is SIGKILLed, then
resumed on 2 processes (the same losses, bit for bit) and on 1 (within 1e-5 relative); kfe export
turns the shards into a plain state dict. The reference run saves asynchronously (--async_ckpt)."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.train.util import ROOT, TINY, env, metrics

STEPS = 6
ARGS = ["train", "supervised", "--data", "shapes", *TINY, "--steps", str(STEPS), "--drop_path", "0", "--mixup", "0",
        "--cutmix", "0", "--ema", "false", "--eval_every", "0", "--lr", "5e-3", "--keep_ckpts", "0",
        "--dist", "fsdp", "--ckpt_every", "2", "--shapes.val_size", "16"]


def _cmd(nproc: int, out: str, *extra) -> list[str]:
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return [sys.executable, *launch, "-m", "train.cli", *ARGS, "--out", out, *extra]


def _run(nproc: int, out: str, *extra) -> subprocess.CompletedProcess:
    r = subprocess.run(_cmd(nproc, out, *extra), env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _kill_tree(pid: int) -> None:
    """SIGKILL torchrun and its workers at once (the workers run in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _losses(out: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out)}


@pytest.mark.slow  # 4 launches of 2 (or 1) gloo processes: ~40 s alone, ~90 s on the loaded 2-core machine
def test_sigkill_then_resume_on_two_and_one_process(tmp_path):
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    _run(2, ref, "--async_ckpt", "true")  # written in the background; the resumed runs below save synchronously
    assert sorted(n for n in os.listdir(ref) if n.startswith("ckpt-")) == [
        "ckpt-00000002.dcp", "ckpt-00000004.dcp", "ckpt-00000006.dcp"]
    shards = sorted(os.listdir(os.path.join(ref, "ckpt-00000006.dcp")))
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "kfe-meta.pt"]  # each rank wrote its own

    proc = subprocess.Popen(_cmd(2, cut), env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while not os.path.isdir(os.path.join(cut, "ckpt-00000004.dcp")):  # killed after the step-4 checkpoint
        assert proc.poll() is None and time.time() < deadline, "the run ended before its step-4 checkpoint"
        time.sleep(0.02)
    _kill_tree(proc.pid)
    proc.wait()
    time.sleep(1)
    assert not os.path.exists(os.path.join(cut, "ckpt-00000006.dcp"))
    partial = os.path.join(cut, ".ckpt-00000006.dcp.tmp")  # what a kill during a save leaves: never read
    os.makedirs(partial, exist_ok=True)
    open(os.path.join(partial, "__0_0.distcp"), "wb").write(b"half a shard")
    one = str(tmp_path / "one")
    shutil.copytree(cut, one)

    r = _run(2, cut, "--resume", "auto")
    assert "resuming at step 4" in r.stdout
    expected = _losses(ref)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert _losses(cut) == expected  # same world size: bit-exact
    assert not os.path.exists(partial)  # removed at the start

    r = _run(1, one, "--resume", "auto")
    assert "resuming at step 4" in r.stdout
    got = _losses(one)
    for step in (5, 6):  # another world size: the same samples per step, float rounding apart
        assert abs(got[step] - expected[step]) <= 1e-5 * abs(expected[step]), (step, got[step], expected[step])
    assert os.path.isfile(os.path.join(one, "ckpt-00000006.pt"))  # one process: a single-file checkpoint

    from train.run import export_checkpoint

    sd = export_checkpoint(os.path.join(ref, "ckpt-00000006.dcp"), str(tmp_path / "w.pt"))
    plain = torch.load(os.path.join(one, "ckpt-00000006.pt"), weights_only=False)["model"]
    assert list(sd) == list(plain) or sorted(sd) == sorted(plain)
    for k, v in sd.items():
        torch.testing.assert_close(v, plain[k], rtol=1e-4, atol=1e-5, msg=k)
