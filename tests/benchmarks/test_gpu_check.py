"""benchmarks/gpu_check.sh: the dry run (same phases and code path as on the GPU, CPU and tiny sizes)
yields the tarball and a summary row per op, and a suite cut by its time limit reads CUT, not pass."""
import json
import os
import subprocess
import sys
import tarfile

import pytest

from engine.bench import gpusummary

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPS = ("grn", "sparse", "hog", "contrastive", "attention")


@pytest.mark.slow  # ~25 s on an idle 2-core machine (one pytest collection, five tiny suites)
def test_dry_run_packs_every_phase_and_reports_cut_suites(tmp_path):
    out = tmp_path / "out"
    # Force two cuts: attention's tests and HOG's benchmark rows get a 0 s limit.
    env = {**os.environ, "PYTHON": sys.executable, "KFE_GPU_CHECK_LIMITS": "tests.attention=0,bench.hog=0"}
    proc = subprocess.run([os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a cut is never a pass
    assert sorted(os.listdir(out)) == ["gpu_check.tar.gz", "summary.md"]  # the device tool returns 8 files
    summary = (out / "summary.md").read_text()
    assert proc.stdout.rstrip().endswith(summary.rstrip())  # printed last (the tool keeps the tail)
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = {os.path.normpath(n) for n in tar.getnames()}
        env_txt = tar.extractfile("./env.txt").read().decode()
    assert "KFE doctor" in env_txt and "Why auto picks" in env_txt
    assert {"env.txt", "ceilings.json", "tests.log", "tests-progress.json", "bench.log", "bench-status.json",
            "phases.json", "summary.md"} <= names
    assert {f"bench-{op}.json" for op in OPS if op != "hog"} <= names  # hog: cut before its first row
    table = summary.split("| op | GPU tests |", 1)[1].split("\n\n", 1)[0]  # the one-row-per-op table
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    for op in OPS:
        assert op in rows, summary
    assert "CUT by its 0 s limit" in rows["attention"].split("|")[2]  # tests column
    assert "CUT by its 0 s limit" in rows["hog"].split("|")[3]        # benchmarks column
    for op in ("grn", "sparse", "contrastive"):
        tests, bench = rows[op].split("|")[2:4]
        assert "CUT" not in tests and "skip" in tests  # gpu tests skip without a GPU
        assert bench.strip().startswith("done:")
        assert float(rows[op].split("|")[5].split()[0]) > 0  # kfe ms of the headline row
    assert "measured ceilings: copy bandwidth" in summary and "DRY RUN" in summary


def test_tests_cell_says_cut_failed_or_counts():
    def progress(**op):
        base = {"collected": 4, "passed": 4, "failed": 0, "skipped": 0, "cut": 0, "failures": []}
        return {"ops": {"grn": {**base, **op}}}
    assert gpusummary.tests_cell("grn", progress(), {"rc": 0}, 25) == "4 pass / 0 fail / 0 skip"
    assert gpusummary.tests_cell("grn", progress(passed=3, failed=1), {"rc": 1}, 25).startswith("FAIL")
    assert gpusummary.tests_cell("grn", progress(passed=1, cut=3), {"rc": 0}, 25).startswith("CUT by its 25 s")
    # killed from outside after 2 of 4 tests: the missing ones make it a cut
    assert gpusummary.tests_cell("grn", progress(passed=2), {"rc": -9, "timed_out": True}, 25).startswith(
        "CUT by the phase limit")
    assert gpusummary.tests_cell("grn", None, {"rc": 4}, 25).startswith("NOT RUN")


def test_bench_cell_and_ceiling():
    status = {"attention": {"state": "running", "priority_total": 6, "priority_timed": 2, "other_total": 5,
                            "other_timed": 0, "errors": 0, "notes": []}}
    assert gpusummary.bench_cell("attention", status, {"timed_out": True}).startswith("CUT by the phase limit")
    assert gpusummary.bench_cell("grn", status, {"timed_out": True}).startswith("NOT RUN")
    ceilings = {"bandwidth_gbs": 4000, "matmul_tflops": 800}  # balance: 200 FLOP/byte
    bound_by_bw = {"ms": {"p50": 1.0}, "bytes": 2e9, "flops": 1e9}
    bound_by_mm = {"ms": {"p50": 1.0}, "bytes": 1e6, "flops": 4e11}
    assert gpusummary.pct_ceiling(bound_by_bw, ceilings) == "50% BW"
    assert gpusummary.pct_ceiling(bound_by_mm, ceilings) == "50% MM"


def test_progress_plugin_cuts_an_op_past_its_limit(tmp_path):
    """The pytest plugin on a toy test file: op 'slow' has a 0 s limit, op 'fast' none."""
    (tmp_path / "test_fast.py").write_text("def test_a():\n    pass\n\ndef test_b():\n    assert False\n")
    (tmp_path / "test_slow.py").write_text("def test_c():\n    pass\n\ndef test_d():\n    pass\n")
    (tmp_path / "test_broken.py").write_text("import no_such_module_here\n")
    progress = tmp_path / "progress.json"
    env = {**os.environ, "KFE_PROGRESS": str(progress), "PYTHONPATH": os.path.join(ROOT, "benchmarks"),
           "KFE_PROGRESS_OPS": json.dumps({"test_fast.py": "fast", "test_slow.py": "slow", "test_broken.py": "broken"}),
           "KFE_PROGRESS_LIMITS": json.dumps({"slow": 0})}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_check_progress",
                    "--continue-on-collection-errors", "test_fast.py", "test_broken.py", "test_slow.py"],
                   cwd=tmp_path, env=env, capture_output=True, timeout=120)
    state = json.loads(progress.read_text())
    assert state["finished"]
    fast, slow = state["ops"]["fast"], state["ops"]["slow"]
    assert (fast["collected"], fast["passed"], fast["failed"], fast["cut"]) == (2, 1, 1, 0)
    assert fast["failures"] == ["test_fast.py::test_b"]
    assert (slow["collected"], slow["passed"], slow["cut"]) == (2, 0, 2)
    assert state["ops"]["broken"]["collect_errors"] == 1  # a file that does not import is not "0 tests"
    assert gpusummary.tests_cell("broken", state, {"rc": 1}, 30).startswith("FAIL")
