"""Benchmark records as a markdown table (stdout) and JSON (--json PATH)."""
from __future__ import annotations

import json
import os


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(records: list[dict]) -> str:
    if not records:
        return "(no records)"
    meta = records[0]
    lines = [f"device: {meta['device']} | torch {meta['torch']} | triton {meta['triton']}"
             f"{' (interpreter)' if meta['triton_interpret'] else ''} | git {meta['git']} | {meta['date']}",
             f"roofline: measured copy bandwidth {meta['measured_bandwidth_gbs']:.0f} GB/s" if
             "measured_bandwidth_gbs" in meta else "", "",
             "| op | shape | dtype | mode | provider | median ms | p20-p80 ms | GB/s | % BW | TFLOP/s | speedup | peak MB |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['mode']} | {r['provider']} | "
                         f"failed: {r['error'][:80]} |||||||")
            continue
        speed = next((v for k, v in r.items() if k.startswith("speedup_vs_")), None)
        ms = r["ms"]
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['mode']} | {r['provider']} | {ms['p50']:.3f} | "
            f"{ms['p20']:.3f}-{ms['p80']:.3f} | {_fmt(r.get('gbs'), '.1f')} | {_fmt(r.get('pct_bandwidth'), '.0f')} | "
            f"{_fmt(r.get('tflops'), '.2f')} | {_fmt(speed, '.2f') + ('x' if speed else '')} | "
            f"{_fmt(r.get('peak_mem_mb'), '.0f')} |")
    return "\n".join(lines)


def write_json(records: list[dict], path: str) -> None:
    """Atomically write the records (a crash never leaves half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
    os.replace(tmp, path)
