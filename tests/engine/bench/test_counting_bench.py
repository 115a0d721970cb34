"""`kfe bench` counts the KFE kernels' work (engine/bench/counting.py): in a child process under the
interpreter, at a count shape, scaled to the row by the ideal's ratio."""
import json

import pytest
import torch

from engine.backend import triton_interpreting
from engine.bench import counting
from train.cli import main
from engine.ops.contrastive import bench as contrastive_bench
from engine.ops.grn import bench as grn_bench

pytestmark = pytest.mark.skipif(not triton_interpreting(), reason="counts the Triton interpreter")


def _suite_cases(module, sizes, dtype):
    cases = module.cases(torch.device("cpu"), sizes, [dtype])
    for case in cases:
        case.suite = module.__name__
    return cases


@pytest.mark.slow  # ~25 s of CPU: one child process, the direct counts in this one
def test_scaled_counts_match_the_direct_count_at_the_row_shape(monkeypatch):
    """The scaling laws, checked: GRN counted at one sample and scaled by the ideal's ratio equals the
    count at N = 3; contrastive counted at B = 64 and scaled by (B / 64)^2 equals the count at B = 128
    (8 B^2 D FLOPs exactly, bytes within 2%). A row the child cannot rebuild says why."""
    monkeypatch.setattr(contrastive_bench, "count_size", lambda size: (64, size[1]))
    grn_case = _suite_cases(grn_bench, [(3, 8, 8, 40)], torch.float32)[0]
    clip_case = next(c for c in _suite_cases(contrastive_bench, [(128, 32)], torch.float32)
                     if c.op == "contrastive-clip")
    bad = _suite_cases(grn_bench, [(1, 4, 4, 8)], torch.float32)[0]
    bad.shape = "1x4x4x8 no such variant"  # the child finds no case of this kind at the count shape
    modes = ["fwd", "fwd+bwd"]
    job = counting.CountJob([grn_case, clip_case, bad], modes)
    assert job.requests[0]["size"] == [1, 8, 8, 40]
    got = job.result()
    for case in (grn_case, clip_case):
        direct = {r["mode"]: r for r in counting.count_case(case, modes)}
        for mode in modes:
            entry = got[(case.op, case.shape, "float32", "kfe", mode)]
            assert "error" not in entry, entry
            assert entry["flops"] == direct[mode]["flops"]
            rel = 1e-9 if case is grn_case else 2e-2  # contrastive: its O(B D) bytes scale as B^2 too
            assert entry["moved_bytes"] == pytest.approx(direct[mode]["moved_bytes"], rel=rel)
            assert entry["launches"] == direct[mode]["launches"]
    clip = got[("contrastive-clip", "128x32", "float32", "kfe", "fwd+bwd")]
    assert clip["flops"] == 8 * 128 ** 2 * 32 and clip["flops_vs_ideal"] == pytest.approx(8 / 6)
    assert got[("grn", "3x8x8x40", "float32", "kfe", "fwd")]["launches"] == 2
    assert "no case of this kind" in got[("grn", bad.shape, "float32", "kfe", "fwd")]["error"]


def test_kfe_bench_prints_and_writes_the_counted_work(tmp_path, capsys):
    path = tmp_path / "grn.json"
    rc = main(["bench", "grn", "--sizes", "2x6x6x40", "--modes", "fwd,fwd+bwd", "--warmup", "0", "--repeats", "1",
               "--providers", "kfe", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "counted work" in out and "| grn | 2x6x6x40 | float32 | fwd | kfe | 1x6x6x40 |" in out
    counted = {r["mode"]: r["counted"] for r in json.loads(path.read_text()) if r["provider"] == "kfe"}
    assert counted["fwd"]["launches"] == 2 and counted["fwd+bwd"]["launches"] == 4
    assert 1 <= counted["fwd"]["bytes_vs_ideal"] <= 1.25 and 1 <= counted["fwd+bwd"]["bytes_vs_ideal"] <= 1.25
    rc = main(["bench", "grn", "--sizes", "1x4x4x8", "--modes", "fwd", "--warmup", "0", "--repeats", "1",
               "--providers", "kfe", "--no-count"])
    assert rc == 0 and "counted work" not in capsys.readouterr().out


def test_attach_turns_a_gpu_time_into_percent_of_the_measured_ceilings():
    key = ("contrastive-clip", "4096x512", "bfloat16", "kfe", "fwd+bwd")
    counts = {key: {"flops": 8e12, "moved_bytes": 2e9, "launches": 2}}
    gpu = {"op": key[0], "shape": key[1], "dtype": key[2], "provider": "kfe", "mode": "fwd+bwd",
           "device_type": "cuda", "ms": {"p50": 20.0}}
    cpu = {**gpu, "device_type": "cpu"}
    counting.attach([gpu, cpu], counts, bandwidth=4e12, matmul_rate=800e12)
    assert gpu["counted"]["pct_matmul_executed"] == pytest.approx(50.0)  # 8e12 / 0.02 s = 400 TFLOP/s
    assert gpu["counted"]["pct_bandwidth_moved"] == pytest.approx(2.5)  # 2e9 / 0.02 s = 100 GB/s
    assert "pct_matmul_executed" not in cpu["counted"]  # no ceiling on the CPU rows
