"""Phase 2 of benchmarks/gpu_check.sh: the benchmark rows that matter, first, within time limits.

    python -m engine.bench.gpuplan WORKDIR --device cuda --suites grn,sparse,hog,contrastive,attention \
        --limits grn=20,... --phase-limit 170 [--dry-run] [--no-compiled]

Per suite, in this order, each row timed by engine.bench (GPU: median of >= 50 calls, L2 flushed,
inputs rotated, launch overhead apart):
  1. the KFE providers on the auto backend ("kfe", "kfe-rows"...) at the priority cases, fwd then fwd+bwd;
  2. the reference and the peers (SDPA backends, flash-attn / xformers, open_clip, timm...) there;
     then KFE on forced other backends ("kfe[reference]", "kfe[triton]") there;
  3. the remaining cases of the suite, KFE first, while the suite's limit lasts (plus what the suites
     before it left unused).
After every suite, if phase time remains: 4. torch.compile(reference) at the priority cases.
Priority cases: attention N in {197, 257, 1024}; contrastive B = 16384 and 65536; sparse at mask 0.6;
GRN and HOG at their first (largest) issue shape. --dry-run: the same plan at tiny sizes on the CPU.

WORKDIR gets bench-<suite>.json (every record, rewritten after each) and bench-status.json: per suite
its state (done / cut / running), how many priority and other rows were timed of how many, so a suite
stopped by its limit, or a worker killed from outside, is reported as cut.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from engine.bench import core
from engine.bench.report import write_json

ORDER = ("grn", "sparse", "hog", "contrastive", "attention")
MODES = ("fwd", "fwd+bwd")
COMPILED = "compiled-reference"
T0 = time.monotonic()


def plan(suite: str, device: torch.device, dry: bool) -> tuple[list[core.Case], list[core.Case]]:
    """(priority cases, other cases) of a suite."""
    bf16 = torch.float32 if dry else torch.bfloat16
    if suite == "grn":
        from engine.ops.grn import bench
        sizes = [(1, 4, 4, 8)] if dry else bench.GPU_SIZES
        return (bench.cases(device, sizes[:1], [bf16]),
                [] if dry else bench.cases(device, sizes[1:], [bf16]) + bench.cases(device, sizes, [torch.float32]))
    if suite == "sparse":
        from engine.ops.sparse_conv import bench
        sizes = [(1, 14, 14, 8)] if dry else bench.GPU_SIZES
        rest = [] if dry else (bench.cases(device, sizes[1:], [bf16], ratios=(0.6,))
                               + bench.cases(device, sizes[:1], [bf16], ratios=(0.0, 0.4, 0.75)))
        return bench.cases(device, sizes[:1], [bf16], ratios=(0.6,)), rest
    if suite == "hog":
        from engine.ops.hog import bench
        cases = bench.cases(device, [(1, 3, 32, 32)] if dry else bench.GPU_SIZES, [torch.float32] if dry else None)
        return cases[:2], cases[2:]  # fp32 unmasked and masked first
    if suite == "contrastive":
        from engine.ops.contrastive import bench
        if dry:
            return bench.cases(device, [(64, 16)], [torch.float32]), []
        first = [(16384, 512), (65536, 512)]
        rest = [s for s in bench.GPU_SIZES if s not in first]
        return bench.cases(device, first, [bf16]), bench.cases(device, rest, [bf16])
    if suite == "attention":
        from engine.ops.attention import bench
        if dry:
            return [bench.case_for(device, (1, 2, n, n, 8), False, torch.float32) for n in (16, 24)], []
        first = [(256, 12, 197, 197, 64), (128, 16, 257, 257, 80), (32, 16, 1024, 1024, 64)]
        rest = [(shape, causal) for _, shape, causal in bench.GPU_SHAPES if shape not in first]
        return ([bench.case_for(device, s, False, bf16) for s in first],
                [bench.case_for(device, s, c, bf16) for s, c in rest])
    raise ValueError(f"unknown suite {suite!r}; known: {', '.join(ORDER)}")


def modes_of(case: core.Case) -> list[str]:
    """fwd and fwd+bwd where the case has them (HOG's targets are forward-only)."""
    return [m for m in MODES if m in case.bytes or m in case.flops]


def is_kfe(name: str) -> bool:
    return name.startswith("kfe")


def is_auto_kfe(name: str) -> bool:
    """KFE as users run it (auto backend): "kfe", "kfe-rows"...; not "kfe[reference]" (a forced backend)."""
    return is_kfe(name) and "[" not in name


def rows(cases: list[core.Case], which) -> list[tuple[core.Case, str, str]]:
    """(case, mode, provider) for the providers `which(name)` selects, case by case, fwd first."""
    return [(c, m, p) for c in cases for m in modes_of(c) for p in c.providers if which(p)]


class Status:
    """bench-status.json: per suite its state and counts, written after every row."""

    def __init__(self, workdir: str):
        self.path, self.suites = os.path.join(workdir, "bench-status.json"), {}

    def suite(self, name: str, **fields) -> dict:
        entry = self.suites.setdefault(name, {"state": "pending", "priority_total": 0, "priority_timed": 0,
                                              "other_total": 0, "other_timed": 0, "compiled_total": 0,
                                              "compiled_timed": 0, "errors": 0, "notes": []})
        entry.update(fields)
        self.write()
        return entry

    def write(self) -> None:
        write_json(self.suites, self.path)


def time_row(case: core.Case, mode: str, name: str, warmup: int, repeats: int, priority: bool) -> dict:
    # _time_provider reports a failing provider as a record with "error" instead of raising.
    meta = {"baseline": case.baseline, "priority": priority, "suite_pass": None}
    return {**core.machine.info(case.device), **meta,
            **core._time_provider(case, name, case.providers[name], mode, warmup, repeats)}


def run_suite(suite: str, device: torch.device, dry: bool, limit: float, phase_end: float, status: Status,
              workdir: str, warmup: int, repeats: int, records: dict) -> list[core.Case]:
    """Passes 1-3 of one suite; returns its priority cases (for the compiled pass)."""
    end = min(time.monotonic() + limit, phase_end)
    entry = status.suite(suite, state="planning", limit_s=limit)
    try:
        first, rest = plan(suite, device, dry)
    except Exception as err:  # noqa: BLE001 - a suite that cannot even build its cases is reported
        status.suite(suite, state="error", notes=[f"plan failed: {err!r}"[:300]])
        return []
    job = _start_counting(suite, first, device, dry)
    passes = [("kfe", True, rows(first, is_auto_kfe)),
              ("peers", True, rows(first, lambda p: not is_kfe(p) and p != COMPILED)),
              ("kfe-backends", False, rows(first, lambda p: is_kfe(p) and not is_auto_kfe(p))),
              ("rest", False, rows(rest, is_kfe) + rows(rest, lambda p: not is_kfe(p) and p != COMPILED))]
    entry = status.suite(suite, state="running", priority_total=len(passes[0][2]) + len(passes[1][2]),
                         other_total=len(passes[2][2]) + len(passes[3][2]),
                         compiled_total=len(rows(first, lambda p: p == COMPILED)))
    out = records.setdefault(suite, [])
    path = os.path.join(workdir, f"bench-{suite}.json")
    for label, priority, todo in passes:
        for case, mode, name in todo:
            if time.monotonic() >= end:
                status.suite(suite, state="cut", notes=entry["notes"] + [f"limit {limit:.0f} s reached in pass {label}"])
                _attach_counts(job, out, path, device, 5.0)
                return first
            print(f"  [{suite} {time.monotonic() - T0:.1f}s] {label}: {case.op} {case.shape} {mode} {name}",
                  file=sys.stderr, flush=True)
            rec = time_row(case, mode, name, warmup, repeats, priority)
            rec["suite_pass"] = label
            out.append(rec)
            write_json(out, path)
            key = "priority_timed" if priority else "other_timed"
            status.suite(suite, **{key: entry[key] + 1, "errors": entry["errors"] + ("error" in rec)})
    _attach_counts(job, out, path, device, max(5.0, end - time.monotonic()))
    status.suite(suite, state="done")
    return first


def _start_counting(suite: str, first: list[core.Case], device: torch.device, dry: bool):
    """On a GPU, count the priority cases' Triton work (engine/bench/counting.py: a CPU child process
    under the interpreter, alongside the timing), so the records get % of the measured ceilings."""
    from engine.bench import SUITES, counting

    if dry or device.type != "cuda" or suite not in SUITES:
        return None
    for case in first:
        case.suite = SUITES[suite]
    modes = [m for m in MODES if any(m in modes_of(c) for c in first)]
    return counting.CountJob(first, modes)


def _attach_counts(job, out: list[dict], path: str, device: torch.device, timeout: float) -> None:
    from engine.bench import counting

    if job is None:
        return
    counting.attach(out, job.result(timeout), core.machine.measured_bandwidth(str(device)),
                    core.machine.measured_matmul_rate(str(device)))
    write_json(out, path)


def run_compiled(suite: str, first: list[core.Case], phase_end: float, status: Status, workdir: str,
                 warmup: int, repeats: int, records: dict) -> None:
    """Pass 4: torch.compile(reference) at the priority cases, only while phase time remains."""
    entry = status.suite(suite)
    out = records.setdefault(suite, [])
    for case, mode, name in rows(first, lambda p: p == COMPILED):
        if time.monotonic() >= phase_end:
            status.suite(suite, notes=entry["notes"] + ["compiled-reference: phase time ran out"])
            return
        rec = time_row(case, mode, name, warmup, repeats, False)
        rec["suite_pass"] = "compiled"
        out.append(rec)
        write_json(out, os.path.join(workdir, f"bench-{suite}.json"))
        status.suite(suite, compiled_timed=entry["compiled_timed"] + 1)


def parse_limits(text: str) -> dict[str, float]:
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise SystemExit(f"--limits: expected name=seconds, got {item!r}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workdir")
    p.add_argument("--device", default="cuda")
    p.add_argument("--suites", default=",".join(ORDER))
    p.add_argument("--limits", default="", help="suite=seconds,... (default 30 each)")
    p.add_argument("--phase-limit", type=float, default=170.0)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--no-compiled", action="store_true", help="skip pass 4 (torch.compile of the reference)")
    args = p.parse_args(argv)
    phase_end = time.monotonic() + args.phase_limit
    device = torch.device(args.device)
    limits = parse_limits(args.limits)
    warmup, repeats = (1, 3) if args.dry_run else (10, 50)
    status, records, firsts = Status(args.workdir), {}, {}
    suites = [s for s in args.suites.split(",") if s]
    for suite in suites:
        status.suite(suite)
    saved = 0.0  # seconds earlier suites left unused: later suites may spend them (not a forced 0 s limit)
    for suite in suites:
        limit = limits.get(suite, 30.0)
        t0 = time.monotonic()
        firsts[suite] = run_suite(suite, device, args.dry_run, limit + saved if limit > 0 else 0.0, phase_end,
                                  status, args.workdir, warmup, repeats, records)
        if limit > 0:
            saved = max(0.0, limit + saved - (time.monotonic() - t0))
    for suite in suites:
        if args.no_compiled:
            if status.suites[suite]["compiled_total"]:
                status.suite(suite, notes=status.suites[suite]["notes"] + ["compiled-reference not timed (--no-compiled)"])
            continue
        run_compiled(suite, firsts[suite], phase_end, status, args.workdir, warmup, repeats, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
