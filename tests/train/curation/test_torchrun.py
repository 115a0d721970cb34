"""`kfe curate metaclip` under torchrun (2 gloo processes) gives the single-process output."""
import json
import os
import subprocess
import sys

from tests.train.curation import pools
from train.curation.metaclip import curate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_two_ranks_match_one_process(tmp_path):
    entries, texts = pools.corpus(seed=3)
    shards = pools.jsonl_pool(str(tmp_path / "pool"), texts, n_shards=5)
    (tmp_path / "pool" / "00005.tar").write_bytes(b"\x00garbage" * 100)  # rank 1's: unreadable
    shards.append(str(tmp_path / "pool" / "00005.tar"))
    meta = tmp_path / "meta.txt"
    meta.write_text("\n".join(entries))
    single = str(tmp_path / "single")
    curate(str(meta), shards, single, t=12, seed=4, workers=1)

    multi = str(tmp_path / "multi")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train.cli",
           "curate", "metaclip", "--metadata", str(meta), "--pool", *shards, "--out", multi, "--t", "12",
           "--seed", "4", "--workers", "1", "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = pools.read_out(single), pools.read_out(multi)
    assert two[:2] == one[:2] and one[0]
    assert {k: two[2][k] for k in pools.STABLE_SUMMARY_KEYS} == {k: one[2][k] for k in pools.STABLE_SUMMARY_KEYS}
    assert two[2]["world_size"] == 2 and two[2]["shards"]["unreadable"] == 1
    assert two[2]["workers_per_rank"] == [1, 1] and two[2]["resumed_shards"] == 0  # every rank, not rank 0's
    assert "unreadable shard skipped" in proc.stderr
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["kept"] == one[2]["kept"]
