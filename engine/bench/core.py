"""Benchmark cases and the loop that times them.

A suite (one per op, e.g. engine/ops/grn/bench.py) returns Cases. A Case is one input shape and dtype
with several providers (reference eager, torch.compile(reference), the KFE op, peers) that compute
the same function, plus the minimum bytes and the useful FLOPs of each mode. `run` times every
provider in every mode and returns one record per (op, provider, mode, shape, dtype).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from engine.bench import counting, machine
from engine.bench.timing import input_bytes, l2_bytes, peak_memory_mb, rotation_sets, time_fn

MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass
class Case:
    op: str
    shape: str                                  # e.g. "64x56x56x512"
    dtype: torch.dtype
    device: torch.device
    make_inputs: Callable[[], tuple]            # fresh inputs for one provider
    providers: dict[str, Callable]              # name -> fn(*inputs) -> tensor
    bytes: dict[str, float]                     # mode -> minimum bytes moved
    flops: dict[str, float] = field(default_factory=dict)  # mode -> useful FLOPs
    grad_inputs: Sequence[int] = (0,)           # inputs differentiated in bwd modes
    baseline: str = "reference"                 # provider the speedups are relative to
    suite: str = ""                             # suite module (set by kfe bench): counting rebuilds the case


def _step(fn: Callable, inputs: tuple, mode: str, grad_inputs: Sequence[int]) -> Callable[[], object]:
    if mode == "fwd":
        def forward():
            with torch.no_grad():
                return fn(*inputs)
        return forward
    leaves = [inputs[i] for i in grad_inputs]
    if mode == "fwd+bwd":
        def forward_backward():
            out = fn(*inputs)
            return torch.autograd.grad(out, leaves, torch.ones_like(out))
        return forward_backward
    out = fn(*inputs)  # bwd: one forward, then time only the backward through its graph
    upstream = torch.ones_like(out)
    return lambda: torch.autograd.grad(out, leaves, upstream, retain_graph=True)


def _prepare(case: Case, mode: str) -> tuple:
    inputs = case.make_inputs()
    if mode == "fwd":
        return inputs
    return tuple(t.detach().requires_grad_(True) if i in case.grad_inputs else t for i, t in enumerate(inputs))


def step_of(case: Case, fn: Callable, mode: str) -> Callable[[], object]:
    """One timed call of provider fn on fresh inputs of the case, in mode (fwd / bwd / fwd+bwd)."""
    return _step(fn, _prepare(case, mode), mode, case.grad_inputs)


def steps_of(case: Case, fn: Callable, mode: str) -> list[Callable[[], object]]:
    """Steps over as many input sets as the GPU timing rotates through (timing.rotation_sets: together
    twice the L2 cache); one on the CPU."""
    inputs = _prepare(case, mode)
    steps = [_step(fn, inputs, mode, case.grad_inputs)]
    if case.device.type == "cuda":
        free = torch.cuda.mem_get_info(case.device)[0]
        sets = rotation_sets(input_bytes(inputs), l2_bytes(case.device), free)
        steps += [step_of(case, fn, mode) for _ in range(sets - 1)]
    return steps


def _time_provider(case: Case, name: str, fn: Callable, mode: str, warmup: int, repeats: int) -> dict:
    dtype = str(case.dtype).removeprefix("torch.")
    rec = {"op": case.op, "provider": name, "mode": mode, "shape": case.shape, "dtype": dtype}
    try:
        steps = steps_of(case, fn, mode)
        sets = len(steps)
        t = time_fn(steps, case.device, warmup, repeats, graph=True)
        mem = peak_memory_mb(steps[0], case.device)
    except Exception as err:  # noqa: BLE001 - a provider that fails is reported, not fatal
        return {**rec, "error": repr(err)[:300]}
    finally:
        steps = None  # free the input sets before the next provider allocates its own
    seconds = t["p50"] * 1e-3
    rec.update(ms={k: t[k] for k in ("p20", "p50", "p80")}, input_sets=sets,
               peak_mem_mb=mem, bytes=case.bytes.get(mode), flops=case.flops.get(mode))
    for key in ("repeats", "graph_ms", "launch_ms", "graph_error"):
        if key in t:
            rec[key] = t[key]
    if rec["bytes"]:
        rec["gbs"] = rec["bytes"] / seconds / 1e9
        rec["pct_bandwidth"] = 100 * rec["bytes"] / seconds / machine.measured_bandwidth(str(case.device))
    if rec["flops"]:
        rec["tflops"] = rec["flops"] / seconds / 1e12
        rec["pct_matmul"] = 100 * rec["flops"] / seconds / machine.measured_matmul_rate(str(case.device))
        peak = machine.spec(case.device).get("bf16_flops")
        if peak:
            rec["pct_peak_flops"] = 100 * rec["flops"] / seconds / peak
    return rec


def _compare(group: list[dict], baseline: str) -> None:
    """Speedups of one (case, mode) group: every provider vs the baseline, and each KFE provider
    ("kfe*") vs the fastest provider that is not KFE's (reference, compiled reference or a peer)."""
    timed = [r for r in group if "ms" in r]
    base = next((r["ms"]["p50"] for r in timed if r["provider"] == baseline), None)
    others = [r for r in timed if not r["provider"].startswith("kfe")]
    best = min(others, key=lambda r: r["ms"]["p50"], default=None)
    for rec in timed:
        if base:
            rec["speedup_vs_" + baseline] = base / rec["ms"]["p50"]
        if best is not None and rec["provider"].startswith("kfe"):
            rec["best_other"] = best["provider"]
            rec["speedup_vs_best_other"] = best["ms"]["p50"] / rec["ms"]["p50"]


def run(cases: Sequence[Case], modes: Sequence[str], warmup: int, repeats: int,
        providers: Sequence[str] | None = None, progress: Callable[[str], None] | None = None,
        on_group: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Time every (case, mode, provider); `providers` filters by name (the baseline always runs).
    `on_group` gets each finished (case, mode) group at once (see report.Reporter), so a run that is
    cut short (a timeout on a borrowed GPU, Ctrl-C) keeps what it measured.
    When `kfe bench` turned counting on (engine.bench.counting.configure), the KFE providers' Triton
    work is counted too (in a child process: alongside the timing on a GPU, after it on the CPU so it
    does not disturb the times), attached to the records as rec["counted"] and printed as a table."""
    records, job = [], None
    if counting.enabled():
        for case in cases:
            case.suite = case.suite or counting.current_suite()
        if any(case.device.type == "cuda" for case in cases):
            job = counting.CountJob(cases, modes)
    for case in cases:
        meta = {**machine.info(case.device),
                "measured_bandwidth_gbs": machine.measured_bandwidth(str(case.device)) / 1e9}
        if any(case.flops.values()):
            meta["measured_matmul_tflops"] = machine.measured_matmul_rate(str(case.device)) / 1e12
        for mode in modes:
            group = []
            for name, fn in case.providers.items():
                if providers and name not in providers and name != case.baseline:
                    continue
                if progress:
                    progress(f"{case.op} {case.shape} {str(case.dtype).removeprefix('torch.')} {mode} {name}")
                group.append({**meta, **_time_provider(case, name, fn, mode, warmup, repeats)})
            _compare(group, case.baseline)
            if on_group:
                on_group(group)
            records += group
    if counting.enabled() and records:
        if progress:
            progress("counting the KFE kernels' work under the Triton interpreter")
        counts = (job or counting.CountJob(cases, modes)).result()
        device = str(cases[0].device)
        cuda = cases[0].device.type == "cuda"
        counting.attach(records, counts, machine.measured_bandwidth(device) if cuda else None,
                        machine.measured_matmul_rate(device) if cuda else None)
        table = counting.markdown(records)
        if table:
            print("\n" + table, flush=True)
    return records
