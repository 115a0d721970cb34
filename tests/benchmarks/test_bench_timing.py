"""engine.bench timing (issue 13, item 2): input rotation, the CPU path, and gpu_check's row order.
The CUDA path (L2 flush, >= 50 events, CUDA graph) runs only on a GPU: benchmarks/gpu_check.sh."""
import pytest
import torch

from engine.bench import core, gpuplan, timing
from engine.ops.attention import bench as attention_bench


def test_rotation_fills_twice_the_cache_within_memory():
    mb = 1 << 20
    assert timing.rotation_sets(40 * mb, 60 * mb, 100_000 * mb) == 3      # 120 MB >= 2 x 60 MB
    assert timing.rotation_sets(1 * mb, 60 * mb, 100_000 * mb) == timing.MAX_SETS
    assert timing.rotation_sets(500 * mb, 60 * mb, 100_000 * mb) == 1     # one set is already larger
    assert timing.rotation_sets(40 * mb, 60 * mb, 400 * mb) == 2          # a quarter of free memory
    assert timing.rotation_sets(40 * mb, 0, 100_000 * mb) == 1            # CPU: no rotation


def test_cpu_time_fn_rotates_steps_and_never_touches_cuda(monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("CPU timing must not call torch.cuda")
    monkeypatch.setattr(torch.cuda, "synchronize", no_cuda)
    monkeypatch.setattr(torch.cuda, "Event", no_cuda)
    calls = []
    steps = [lambda i=i: calls.append(i) for i in range(3)]
    t = timing.time_fn(steps, torch.device("cpu"), warmup=2, repeats=7, graph=True)
    assert calls == [0, 1] + [i % 3 for i in range(7)]
    assert set(t) == {"p20", "p50", "p80"} and 0 <= t["p20"] <= t["p50"] <= t["p80"]


def test_cpu_record_has_one_input_set_and_no_graph_fields():
    case = attention_bench.case_for(torch.device("cpu"), (1, 2, 8, 8, 4), False, torch.float32)
    assert len(core.steps_of(case, case.providers["kfe"], "fwd+bwd")) == 1
    rec = core._time_provider(case, "kfe", case.providers["kfe"], "fwd+bwd", warmup=1, repeats=3)
    assert "error" not in rec, rec
    assert rec["input_sets"] == 1 and set(rec["ms"]) == {"p20", "p50", "p80"}
    assert not {"graph_ms", "launch_ms", "graph_error"} & set(rec)
    assert rec["pct_matmul"] > 0 and rec["pct_bandwidth"] > 0


def test_gpu_check_times_kfe_first_then_peers_and_cuts_at_its_limit(tmp_path):
    status, records = gpuplan.Status(str(tmp_path)), {}
    far = float("inf")
    gpuplan.run_suite("attention", torch.device("cpu"), True, 60.0, far, status, str(tmp_path), 0, 1, records)
    passes = [r["suite_pass"] for r in records["attention"]]
    assert passes == sorted(passes, key=["kfe", "peers", "kfe-backends", "rest"].index) and passes[0] == "kfe"
    assert all(r["provider"].startswith("kfe") for r in records["attention"] if r["suite_pass"] == "kfe")
    assert "compiled-reference" not in {r["provider"] for r in records["attention"]}  # pass 4 is separate
    assert status.suites["attention"]["state"] == "done"
    assert status.suites["attention"]["priority_timed"] == status.suites["attention"]["priority_total"] > 0
    gpuplan.run_suite("grn", torch.device("cpu"), True, 0.0, far, status, str(tmp_path), 0, 1, records)
    assert status.suites["grn"]["state"] == "cut" and status.suites["grn"]["priority_timed"] == 0


@pytest.mark.parametrize("suite", gpuplan.ORDER)
def test_every_suite_has_priority_cases_in_the_dry_plan(suite):
    first, rest = gpuplan.plan(suite, torch.device("cpu"), dry=True)
    assert first and all(any(gpuplan.is_kfe(p) for p in c.providers) for c in first)


def test_gpu_repeats_keep_50_unless_a_row_is_slow():
    assert timing.gpu_repeats(10, 0.05) == timing.GPU_MIN_REPEATS          # asked fewer: still 50
    assert timing.gpu_repeats(100, 0.05) == 100
    assert timing.gpu_repeats(50, 1000 * timing.ROW_BUDGET_S / 20) == 20    # 20 calls fill the row's budget
    assert timing.gpu_repeats(50, 10_000.0) == timing.MIN_SLOW_REPEATS
