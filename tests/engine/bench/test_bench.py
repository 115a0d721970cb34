"""`kfe bench`: the records, the byte counts, the CLI's checks."""
import json

import pytest
import torch

from engine.bench import Reporter, core, markdown
from engine.bench.timing import time_fn
from engine.ops.grn import bench as grn_bench
from train.cli import main


def test_time_fn_quantiles_are_ordered():
    t = time_fn(lambda: torch.randn(64, 64) @ torch.randn(64, 64), torch.device("cpu"), warmup=1, repeats=7)
    assert 0 < t["p20"] <= t["p50"] <= t["p80"]


def test_grn_cases_count_minimum_bytes():
    (case,) = grn_bench.cases(torch.device("cpu"), sizes=[(2, 3, 4, 5)], dtypes=[torch.bfloat16])
    numel_bytes = 2 * 3 * 4 * 5 * 2
    assert case.bytes == {"fwd": 3 * numel_bytes, "bwd": 5 * numel_bytes, "fwd+bwd": 8 * numel_bytes}
    assert {"reference", "compiled-reference", "kfe"} <= set(case.providers)
    x, gamma, beta = case.make_inputs()
    assert x.shape == (2, 3, 4, 5) and x.dtype == torch.bfloat16 and gamma.shape == (5,)


def test_run_records_every_mode_and_provider():
    cases = grn_bench.cases(torch.device("cpu"), sizes=[(1, 4, 4, 8)], dtypes=[torch.float32])
    records = core.run(cases, core.MODES, warmup=0, repeats=2, providers=["kfe"])
    assert {(r["provider"], r["mode"]) for r in records} == {(p, m) for p in ("reference", "kfe") for m in core.MODES}
    for r in records:
        assert "error" not in r, r
        assert r["gbs"] > 0 and r["ms"]["p50"] > 0 and r["git"] is not None and r["torch"] == torch.__version__
        assert r["speedup_vs_reference"] > 0
    assert "| grn | 1x4x4x8 | float32 | fwd+bwd | kfe |" in markdown(records)


def test_cli_runs_every_provider_and_writes_json(tmp_path, capsys):
    path = tmp_path / "grn.json"
    rc = main(["bench", "grn", "--sizes", "1x3x3x8", "--modes", "fwd", "--warmup", "1", "--repeats", "1", "--no-count",
               "--json", str(path)])
    assert rc == 0, capsys.readouterr().out
    records = json.loads(path.read_text())
    assert {r["provider"] for r in records} >= {"reference", "compiled-reference", "kfe"}
    assert all("error" not in r for r in records)


@pytest.mark.parametrize("argv, message", [
    (["bench", "nope"], "unknown suite"),
    (["bench", "grn", "--sizes", "8x56"], "NxHxWxC"),
    (["bench", "grn", "--sizes", "axb"], "--sizes"),
    (["bench", "grn", "--dtype", "int8"], "--dtype"),
    (["bench", "grn", "--modes", "sideways"], "--modes"),
])
def test_cli_rejects_bad_arguments(argv, message):
    with pytest.raises(SystemExit, match=message):  # a clean message, no traceback
        main(argv)


def test_kfe_providers_are_compared_with_the_fastest_other_provider():
    def rec(provider, ms):
        return {"provider": provider, "ms": {"p50": ms}}
    group = [rec("reference", 8.0), rec("compiled-reference", 2.0), rec("peer", 4.0), rec("kfe", 1.0),
             rec("kfe[reference]", 8.0), {"provider": "broken", "error": "boom"}]
    core._compare(group, "reference")
    by = {r["provider"]: r for r in group}
    assert by["kfe"]["best_other"] == "compiled-reference" and by["kfe"]["speedup_vs_best_other"] == 2.0
    assert by["kfe[reference]"]["speedup_vs_best_other"] == 0.25
    assert "speedup_vs_best_other" not in by["peer"] and by["peer"]["speedup_vs_reference"] == 2.0


def test_reporter_keeps_finished_groups_when_a_run_dies(tmp_path, capsys):
    """gpu_check.sh kills a suite at its time limit: every group timed before then must be on disk."""
    path = tmp_path / "partial.json"
    report = Reporter(str(path))
    cases = grn_bench.cases(torch.device("cpu"), sizes=[(1, 2, 2, 8), (1, 3, 3, 8)], dtypes=[torch.float32])

    def die_after_first(group):
        report(group)
        if len(report.records) == len(group):
            raise KeyboardInterrupt  # the kill arrives while the second shape is being timed

    with pytest.raises(KeyboardInterrupt):
        core.run(cases, ["fwd"], warmup=0, repeats=1, providers=["kfe"], on_group=die_after_first)
    saved = json.loads(path.read_text())
    assert {r["shape"] for r in saved} == {"1x2x2x8"} and {r["provider"] for r in saved} == {"reference", "kfe"}
    out = capsys.readouterr().out
    assert "| grn | 1x2x2x8 | float32 | fwd | kfe |" in out and "vs best other" in out



def test_cli_lists_suites(capsys):
    assert main(["bench", "--list"]) == 0
    assert "grn" in capsys.readouterr().out


def test_doctor_reports_each_backend(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for needle in ("torch " + torch.__version__, "triton mode: interpreter", "| grn | cpp | ok",
                   "| grn | reference | ok", "| grn | **auto picks** |"):
        assert needle in out, needle


def test_interleaved_runs_every_step_once_per_round_alternating_the_order():
    from engine.bench.timing import interleaved
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3} and all(t >= 0 for v in times.values() for t in v)


def test_step_of_differentiates_the_case_grad_inputs():
    (case,) = grn_bench.cases(torch.device("cpu"), sizes=[(1, 2, 2, 8)], dtypes=[torch.float32])
    grads = core.step_of(case, case.providers["reference"], "fwd+bwd")()
    assert len(grads) == len(case.grad_inputs) and grads[0].shape == (1, 2, 2, 8)
