"""Outputs of `kfe curate metaclip` (written by rank 0, each file atomically):

    curated.jsonl               one line per kept pair, in shard order: {"id": ..., "entries": [...]}
    entry_counts.json           match count per entry index over the pool (before balancing)
    entry_counts_balanced.json  the same over the kept pairs (after balancing)
    summary.json                pool size, matched, kept, t, seed, shards read / unreadable, timings;
                                resumed_shards (summed over ranks), workers_per_rank (one per rank)
    entry_counts.png            sorted entry counts, log-log: before balancing; pairs kept by the
                                entry's own coin (~min(c, t): the paper's flattened head); and kept
                                pairs containing the entry (a pair kept by a tail entry also counts
                                for the head entries it matches)
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time

import numpy as np


@contextlib.contextmanager
def temporary(path: str, suffix: str = ""):
    """Yield `<path>.tmp<pid><suffix>` to write; renamed onto `path` on success, removed on any error
    (a full disk must not leave partial files; a killed run's are removed by remove_temporaries)."""
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError) and not err.filename:  # a write error: name the file
            raise OSError(err.errno, err.strerror or str(err), path) from None
        raise


_TEMPORARY = re.compile(r"\.tmp\d*(\.\w+)?$")


def remove_temporaries(folder: str) -> None:
    """Partial files a killed run left in `folder` (rank 0, before any writer starts)."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if _TEMPORARY.search(name):
                os.remove(os.path.join(folder, name))


def write_json(path: str, obj) -> None:
    with temporary(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=None if isinstance(obj, list) else 1) + "\n")  # C encoder: fast


def merge(out: str, pass2: str, shards: list[int], counts: np.ndarray, t: float, summary: dict,
          clock: dict) -> int:
    """Concatenate the pass-2 parts of `shards` (in order) and write every output; returns kept."""
    kept_counts, own_counts = np.zeros_like(counts), np.zeros_like(counts)
    kept = 0
    with temporary(os.path.join(out, "curated.jsonl")) as tmp, open(tmp, "wb") as dst:
        for i in shards:
            base = os.path.join(pass2, f"{i:06d}")
            with np.load(base + ".npz") as d:
                kept_counts[d["uniq"]] += d["uniq_counts"]
                own_counts[d["own"]] += d["own_counts"]
                kept += int(d["stats"][0])
            with open(base + ".jsonl", "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)
    write_json(os.path.join(out, "entry_counts.json"), counts.tolist())
    write_json(os.path.join(out, "entry_counts_balanced.json"), kept_counts.tolist())
    summary["kept"] = kept
    summary["plot"] = plot_counts(os.path.join(out, "entry_counts.png"), counts, own_counts, kept_counts, t)
    clock["merge"] = time.perf_counter()
    summary["timings_s"] = _timings(clock)
    pass1 = summary["timings_s"]["pass1_match"]
    summary["pass1_pairs_per_s"] = round(summary["pool_size"] / pass1) if pass1 > 0 else None
    write_json(os.path.join(out, "summary.json"), summary)
    return kept


def _timings(clock: dict) -> dict:
    stages = [("load_and_build_matcher", "build"), ("pass1_match", "pass1"), ("all_reduce", "reduce"),
              ("pass2_balance", "pass2"), ("merge_and_write", "merge")]
    out, prev = {}, clock["start"]
    for name, key in stages:
        out[name] = round(clock[key] - prev, 4)
        prev = clock[key]
    out["total"] = round(prev - clock["start"], 4)
    return out


def plot_counts(path: str, before: np.ndarray, own: np.ndarray, kept: np.ndarray, t: float) -> str:
    """Sorted per-entry counts before / after balancing on log-log axes. Returns what was written."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "skipped: matplotlib is not installed (pip install matplotlib)"
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    curves = ((before, "before balancing (all matches)"), (own, "after: kept by the entry's own coin"),
              (kept, "after: kept pairs matching the entry"))
    for counts, label in curves:
        y = np.sort(counts[counts > 0])[::-1]
        if len(y) == 0:
            continue
        x = np.unique(np.geomspace(1, len(y), num=min(len(y), 2000)).astype(np.int64))  # ranks, thinned
        ax.loglog(x, y[x - 1], label=label)
    ax.axhline(t, color="gray", linestyle="--", linewidth=1, label=f"t = {t:g}")
    ax.set_xlabel("metadata entries, sorted by count (rank)")
    ax.set_ylabel("pairs matching the entry")
    ax.set_title("MetaCLIP balancing: entry counts")
    ax.legend()
    fig.tight_layout()
    with temporary(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110)
    return "entry_counts.png"
