"""summary.md of benchmarks/gpu_check.sh, from the files its phases left in WORKDIR.

One row per op: its GPU tests (passed / failed / skipped, or CUT with what did not run), the headline
benchmark row (the first priority case, fwd+bwd where there is one): KFE's median, launch overhead, the
best other provider and its median, their ratio (> 1: KFE faster) and KFE's % of the measured ceiling
that bounds the op (copy bandwidth, or the bf16 matmul rate where the row's FLOPs per byte exceed the
machine's balance). A suite or test set stopped by a limit says CUT in its row; it never reads as a
pass. Below it, every priority row (KFE vs the best other), then the per-suite tables in bench-*.md.
"""
from __future__ import annotations

import glob
import json
import os

from engine.bench import core, gpuplan
from engine.bench.report import markdown


def _load(path: str, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def tests_cell(op: str, progress: dict | None, phase: dict | None, limit: float | None) -> str:
    if progress is None or op not in progress.get("ops", {}):
        if phase and phase.get("timed_out"):
            return "CUT by the phase limit before this op's tests were collected"
        return f"NOT RUN (pytest exit {phase.get('rc') if phase else '?'}: see tests.log)"
    s = progress["ops"][op]
    counts = f"{s['passed']} pass / {s['failed']} fail / {s['skipped']} skip"
    missing = s["collected"] - s["passed"] - s["failed"] - s["skipped"] - s["cut"]
    if s["cut"]:
        return f"CUT by its {limit or 0:g} s limit: {counts}, {s['cut']} not run"
    if missing > 0:
        return f"CUT by the phase limit: {counts}, {missing} not run"
    if s.get("collect_errors"):
        return f"FAIL: {s['collect_errors']} test file(s) did not import; {counts}"
    if s["failed"]:
        return f"FAIL: {counts}"
    if s["collected"] == 0:
        return "no GPU tests collected"
    return counts


def _best(records: list[dict], kfe: bool) -> dict | None:
    timed = [r for r in records if "ms" in r and gpuplan.is_kfe(r["provider"]) == kfe]
    if kfe and any(r["provider"] == "kfe" for r in timed):
        timed = [r for r in timed if r["provider"] == "kfe"]
    return min(timed, key=lambda r: r["ms"]["p50"], default=None)


def pct_ceiling(rec: dict, ceilings: dict) -> str:
    """KFE's % of whichever measured ceiling bounds the row: bandwidth or matmul rate."""
    seconds = rec["ms"]["p50"] * 1e-3
    bw, mm = ceilings.get("bandwidth_gbs", 0) * 1e9, ceilings.get("matmul_tflops", 0) * 1e12
    flops, nbytes = rec.get("flops") or 0, rec.get("bytes") or 0
    if flops and mm and (not nbytes or not bw or flops / nbytes >= mm / bw):
        return f"{100 * flops / seconds / mm:.0f}% MM"
    if nbytes and bw:
        return f"{100 * nbytes / seconds / bw:.0f}% BW"
    return ""


def groups(records: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in records:
        out.setdefault((r["op"], r["shape"], r["dtype"], r["mode"]), []).append(r)
    for group in out.values():
        core._compare(group, group[0].get("baseline", "reference"))
    return out


def row_cells(group: list[dict], ceilings: dict) -> list[str]:
    """kfe ms, launch ms, best other, its ms, ratio, % ceiling."""
    kfe, other = _best(group, True), _best(group, False)
    failed = [r["provider"] for r in group if "error" in r and gpuplan.is_kfe(r["provider"])]
    if kfe is None:
        return ["FAIL: " + ", ".join(failed) if failed else "not timed", "", "", "", "", ""]
    launch = kfe.get("launch_ms")
    cells = [f"{kfe['ms']['p50']:.3f}" + ("" if kfe["provider"] == "kfe" else f" ({kfe['provider']})"),
             "" if launch is None else f"{launch:.3f}"]
    if other is None:
        cells += ["not timed", "", ""]
    else:
        cells += [other["provider"], f"{other['ms']['p50']:.3f}", f"{other['ms']['p50'] / kfe['ms']['p50']:.2f}x"]
    return cells + [pct_ceiling(kfe, ceilings)]


def bench_cell(suite: str, status: dict | None, phase: dict | None) -> str:
    s = (status or {}).get(suite)
    killed = bool(phase and phase.get("timed_out"))
    if s is None or s["state"] == "pending":
        return "NOT RUN (phase time ran out)" if killed or status else "NOT RUN"
    timed = f"{s['priority_timed']}/{s['priority_total']} priority rows, {s['other_timed']}/{s['other_total']} others"
    if s["state"] == "cut":
        return f"CUT by its {s.get('limit_s', 0):.0f} s limit: {timed}"
    if s["state"] in ("running", "planning"):
        return f"CUT by the phase limit: {timed}"
    if s["state"] == "error":
        return "FAIL: " + "; ".join(s["notes"])
    return f"done: {timed}" + (f", {s['errors']} rows failed" if s["errors"] else "")


def write(work: str) -> str:
    ceilings = _load(os.path.join(work, "ceilings.json"), {})
    phases = _load(os.path.join(work, "phases.json"), {})
    progress = _load(os.path.join(work, "tests-progress.json"))
    status = _load(os.path.join(work, "bench-status.json"))
    lim = phases.get("limits", {})
    dry = phases.get("dry_run", False)
    lines = [f"# gpu_check{' DRY RUN (CPU, tiny sizes: the figures mean nothing)' if dry else ''}", "",
             f"device: {ceilings.get('device', '?')} | torch {ceilings.get('torch')} | triton {ceilings.get('triton')}"
             f" | cuda {ceilings.get('cuda')} | python {ceilings.get('python')} | git {ceilings.get('git')}"
             f" | {ceilings.get('date')}",
             f"measured ceilings: copy bandwidth {ceilings.get('bandwidth_gbs', 0):.0f} GB/s (read + write), "
             f"matmul {ceilings.get('matmul_tflops', 0):.3g} TFLOP/s ({ceilings.get('matmul', '?')})",
             "phases (s used / limit): " + ", ".join(
                 f"{k} {v.get('seconds', '?')}/{v.get('limit_s', '?'):.0f}{' CUT' if v.get('timed_out') else ''}"
                 for k, v in phases.items() if isinstance(v, dict) and "rc" in v)
             + f"; total {phases.get('total_s', '?')} s", "",
             "GPU times: median of >= 50 calls, L2 flushed before each, inputs rotated over > 2x L2; "
             "launch = eager - CUDA graph replay. ratio = best other / kfe (> 1: kfe faster).", "",
             "| op | GPU tests | benchmarks | headline row | kfe ms | launch ms | best other | other ms | ratio "
             "| % ceiling |",
             "|---|---|---|---|---:|---:|---|---:|---:|---:|"]
    details, suites = [], phases.get("ops", list(gpuplan.ORDER))
    for suite in suites:
        records = _load(os.path.join(work, f"bench-{suite}.json"), []) or []
        by_group = groups(records)
        if records:
            with open(os.path.join(work, f"bench-{suite}.md"), "w") as f:
                f.write(markdown([r for g in by_group.values() for r in g]) + "\n")
        priority = [g for g in by_group.values() if any(r.get("priority") for r in g)]
        head = next((g for g in priority if g[0]["mode"] == "fwd+bwd"), priority[0] if priority else None)
        tests = tests_cell(suite, progress, phases.get("phase1"), lim.get(f"tests.{suite}"))
        bench = bench_cell(suite, status, phases.get("phase2"))
        if head is None:
            cells = ["", "not timed", "", "", "", "", ""]
        else:
            r = head[0]
            cells = [f"{r['op']} {r['shape']} {r['dtype']} {r['mode']}"] + row_cells(head, ceilings)
        lines.append(f"| {suite} | {tests} | {bench} | " + " | ".join(cells) + " |")
        for g in priority:
            r = g[0]
            details.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['mode']} | "
                           + " | ".join(row_cells(g, ceilings)) + " |")
        failures = (progress or {}).get("ops", {}).get(suite, {}).get("failures", [])
        details += [f"|   failed test: {f} |||||||||" for f in failures[:5]]
    if "phase3" in phases:
        p3 = phases["phase3"]
        state = "CUT by its limit" if p3["timed_out"] else ("done" if p3["rc"] == 0 else f"FAIL (rc {p3['rc']})")
        lines.append(f"| model (phase 3) | - | {state}, {p3['seconds']} s: see bench-model.md | ||||||")
    lines += ["", "Priority rows (kfe vs the fastest other provider):", "",
              "| op | shape | dtype | mode | kfe ms | launch ms | best other | other ms | ratio | % ceiling |",
              "|---|---|---|---|---:|---:|---|---:|---:|---:|"] + details
    lines += ["", "In gpu_check.tar.gz: env.txt (nvidia-smi, versions, kfe doctor), ceilings.json, tests.log, "
              "tests-progress.json, bench.log, bench-status.json, bench-<suite>.{json,md}, phases.json."]
    if glob.glob(os.path.join(work, "build.log")):
        lines[-1] += " build.log."
    text = "\n".join(lines) + "\n"
    with open(os.path.join(work, "summary.md"), "w") as f:
        f.write(text)
    return text
