"""Benchmark records as a markdown table (stdout) and JSON (--json PATH).

`Reporter` streams them: each finished (case, mode) group is printed and the JSON rewritten at once,
so a run killed by a timeout (benchmarks/gpu_check.sh on a borrowed GPU) keeps what it measured.
"""
from __future__ import annotations

import json
import os
import sys
from typing import TextIO

COLUMNS = ("| op | shape | dtype | mode | provider | median ms | p20-p80 ms | launch ms | GB/s | % BW | TFLOP/s | "
           "% MM | speedup | vs best other | peak MB |")


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def header(meta: dict) -> str:
    """Machine line, roofline line and the table's header, from any record's metadata."""
    lines = [f"device: {meta['device']} | torch {meta['torch']} | triton {meta['triton']}"
             f"{' (interpreter)' if meta['triton_interpret'] else ''} | git {meta['git']} | {meta['date']}",
             f"roofline: measured copy bandwidth {meta['measured_bandwidth_gbs']:.0f} GB/s" +
             (f", measured matmul rate {meta['measured_matmul_tflops']:.3g} TFLOP/s"
              if "measured_matmul_tflops" in meta else "") if "measured_bandwidth_gbs" in meta else "",
             "GPU times: median of >= 50 calls, L2 flushed before each, inputs rotated; launch ms = eager - "
             "CUDA graph replay" if meta.get("device_type") == "cuda" else "",
             "speedup: vs the reference (eager); vs best other: a KFE provider vs the fastest non-KFE one "
             "(reference, compiled reference or a peer), > 1 = KFE faster", "",
             COLUMNS, "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    return "\n".join(lines)


def row(r: dict) -> str:
    head = f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['mode']} | {r['provider']} | "
    if "error" in r:
        return head + f"failed: {r['error'][:80]} ||||||||||"
    speed = next((v for k, v in r.items() if k.startswith("speedup_vs_") and k != "speedup_vs_best_other"), None)
    vs_best = r.get("speedup_vs_best_other")
    best = "" if vs_best is None else f"{vs_best:.2f}x {r['best_other']}"
    ms = r["ms"]
    return (head + f"{ms['p50']:.3f} | {ms['p20']:.3f}-{ms['p80']:.3f} | {_fmt(r.get('launch_ms'), '.3f')} | "
            f"{_fmt(r.get('gbs'), '.1f')} | "
            f"{_fmt(r.get('pct_bandwidth'), '.0f')} | {_fmt(r.get('tflops'), '.2f')} | "
            f"{_fmt(r.get('pct_matmul'), '.0f')} | "
            f"{_fmt(speed, '.2f') + ('x' if speed else '')} | "
            f"{best} | "
            f"{_fmt(r.get('peak_mem_mb'), '.0f')} |")


def markdown(records: list[dict]) -> str:
    if not records:
        return "(no records)"
    return "\n".join([header(records[0])] + [row(r) for r in records])


def write_json(records: list[dict], path: str) -> None:
    """Atomically write the records (a crash never leaves half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
    os.replace(tmp, path)


class Reporter:
    """`on_group` callback for engine.bench.run: prints rows as they are measured and keeps the JSON
    file (if any) up to date with every finished group."""

    def __init__(self, json_path: str | None = None, out: TextIO | None = None):
        self.json_path, self.out, self.records = json_path, out or sys.stdout, []

    def __call__(self, group: list[dict]) -> None:
        if not group:
            return
        if not self.records:
            print(header(group[0]), file=self.out)
        self.records += group
        print("\n".join(row(r) for r in group), file=self.out, flush=True)
        if self.json_path:
            write_json(self.records, self.json_path)

    def finish(self) -> None:
        if not self.records:
            print("(no records)", file=self.out)
        elif self.json_path:
            write_json(self.records, self.json_path)  # again: counting attaches to the records after the timing
            print(f"\nwrote {len(self.records)} records to {self.json_path}", file=self.out)
