"""Failures a long run meets: each is one `error:` line naming the path or key, nothing left behind.

Subprocess runs of the real CLI; a full disk is a real write failure: the child's file-size limit
(RLIMIT_FSIZE, with SIGXFSZ ignored) makes writes past it fail with an OSError, as ENOSPC does.
"""
import json
import os
import resource
import signal
import subprocess
import sys

import pytest

from tests.train.curation import pools
from tests.train.util import ROOT, TINY, env, kfe

pytestmark = pytest.mark.slow  # each test starts the CLI (~5-10 s on the shared 2-core machine)

RUN = ["train", "supervised", "--data", "shapes", "--steps", "2", *TINY, "--shapes.val_size", "16"]


def _error_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode != 0, r.stdout[-2000:]
    err = r.stderr.strip()
    assert "Traceback" not in err, err[-3000:]
    line = err.splitlines()[-1]
    assert "error:" in line and all(n in line for n in needles), err[-2000:]
    return line


def _small_disk(limit: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def _temporaries(folder) -> list[str]:
    return [os.path.join(r, n) for r, _, files in os.walk(folder) for n in files if ".tmp" in n]


@pytest.mark.parametrize("args, key", [
    (["--model", "convnextv2_tiniest"], "--model"),
    (["--model_kwargs", '{"depth": 3}'], "depth"),
])
def test_bad_model_name_or_kwargs_is_one_line_and_leaves_no_run_dir(tmp_path, args, key):
    out = tmp_path / "run"
    r = kfe(*RUN, "--out", str(out), *args)
    _error_line(r, key)
    assert not out.exists()


def test_corrupt_resume_file_and_eval_file_are_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "ckpt-00000002.pt"
    bad.write_bytes(b"PK\x03\x04 not a zip archive at all")
    out = tmp_path / "run"
    _error_line(kfe(*RUN, "--out", str(out), "--resume", str(bad)), str(bad))
    assert not out.exists()
    _error_line(kfe("eval", str(bad)), str(bad))
    _error_line(kfe("export", str(bad), str(tmp_path / "w.pt")), str(bad))


def test_resume_auto_with_no_readable_checkpoint_fails_and_keeps_them(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for step in (2, 4):
        (out / f"ckpt-{step:08d}.pt").write_bytes(b"truncated")
    line = _error_line(kfe(*RUN, "--out", str(out), "--resume", "auto"), "--resume auto", "ckpt-00000004.pt")
    assert "readable" in line
    assert sorted(os.listdir(out)) == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
    assert (out / "ckpt-00000004.pt").read_bytes() == b"truncated"


def test_unwritable_out_is_one_line_naming_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder is needed")
    _error_line(kfe(*RUN, "--out", str(blocker / "run")), str(blocker))


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "train.cli", *RUN, "--out", str(out)], env=env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=240, preexec_fn=_small_disk(60_000))
    _error_line(r, "File too large", str(out / "ckpt-00000002.pt"))
    assert _temporaries(out) == [] and not (out / "ckpt-00000002.pt").exists()


def test_a_full_disk_in_curation_is_one_line_and_leaves_no_temporary(tmp_path):
    entries, texts = pools.corpus()
    shards = pools.jsonl_pool(str(tmp_path / "pool"), texts, n_shards=3)
    (tmp_path / "meta.json").write_text(json.dumps(entries))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "train.cli", "curate", "metaclip", "--metadata",
                        str(tmp_path / "meta.json"), "--pool", *shards, "--out", str(out), "--workers", "1", "--quiet"],
                       env=env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=240, preexec_fn=_small_disk(1500))
    _error_line(r, "File too large", str(out))
    assert _temporaries(out) == []


def test_curation_rerun_removes_a_killed_merge_temporary(tmp_path):
    from train.curation.metaclip import curate

    entries, texts = pools.corpus()
    shards = pools.jsonl_pool(str(tmp_path / "pool"), texts, n_shards=2)
    out = tmp_path / "out"
    curate(entries, shards, str(out), workers=1)
    first = (out / "curated.jsonl").read_bytes()
    (out / "curated.jsonl.tmp4242").write_bytes(first[:10])  # what a kill during the merge leaves
    curate(entries, shards, str(out), workers=1)
    assert _temporaries(out) == [] and (out / "curated.jsonl").read_bytes() == first


def test_the_final_line_is_last_with_the_progress_bar(tmp_path):
    out = tmp_path / "run"
    args = [a if a != "false" else "true" for a in RUN]  # --progress true (the only 'false' in RUN)
    r = subprocess.run([sys.executable, "-m", "train.cli", *args, "--out", str(out)], env=env(),
                       cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:]
    last = r.stdout.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("kfe train supervised: done at step 2/2"), r.stdout[-800:]
