"""`kfe bench curate`: MetaCLIP matching throughput (texts/s) on this machine's cores.

    kfe bench curate [--entries 500000] [--texts 1000000] [--workers N] [--json out.json]
    (or --sizes ENTRIESxTEXTS)

Synthetic metadata and alt-texts (synthetic.py) are matched by
  kfe-cpp        Matcher(backend="cpp").match_flat in batches of 4096 (what `kfe curate` runs)
  kfe-cpp-lists  the same returning a list per text (Matcher.match_batch)
  kfe-python     Matcher(backend="python"), the word-trie fallback
  official       MetaCLIP's approach: pyahocorasick automaton of " e " over the spaced text
  reference      the plain definition (`" e " in spaced` for every entry): timed on a small subset
                 and extrapolated per text (it is ~1e4x slower)
every provider's matches are checked identical to kfe-cpp's on the texts it ran; kfe-cpp is also run
on all cores (fork, one slice of the texts per process). Issue goals: >= 50k texts/s per core,
>= 100x the reference, >= 2x official, matcher memory < 2 GB.
"""
from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import platform
import time

import numpy as np

from train.curation import synthetic
from train.curation.matching import Matcher, OfficialMatcher, cpp_available, match_reference

_BATCH = 4096
_STATE: dict = {}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _flat_all(matcher: Matcher, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    parts = [matcher.match_flat(texts[i:i + _BATCH]) for i in range(0, len(texts), _BATCH)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _slice_worker(bounds: tuple[int, int]) -> float:
    start = time.perf_counter()
    _flat_all(_STATE["matcher"], _STATE["texts"][bounds[0]:bounds[1]])
    return time.perf_counter() - start


def _build(name, fn):
    gc.collect()
    rss, start = _rss(), time.perf_counter()
    obj = fn()
    return obj, {"provider": name, "build_s": round(time.perf_counter() - start, 2), "rss_delta_bytes": _rss() - rss}


def _sizes(args) -> tuple[int, int]:
    entries, texts = 500_000, 1_000_000
    if getattr(args, "sizes", None):
        try:
            entries, texts = (int(v) for v in args.sizes.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--sizes: expected ENTRIESxTEXTS for the curate suite, got {args.sizes!r}") from None
    entries = getattr(args, "entries", None) or entries
    texts = getattr(args, "texts", None) or texts
    if entries < 10 or texts < 10:
        raise SystemExit("curate bench: --entries and --texts must be >= 10")
    return entries, texts


def run(args, device) -> int:
    n_entries, n_texts = _sizes(args)
    workers = getattr(args, "workers", None) or os.cpu_count() or 1
    print(f"curate bench: {n_entries} entries x {n_texts} texts on {_cpu_name()} ({os.cpu_count()} cores)")
    start = time.perf_counter()
    vocab = synthetic.vocabulary(max(int(0.8 * n_entries), 100))
    entries = synthetic.entries(n_entries, vocab)
    texts = synthetic.texts(n_texts, vocab, entries[int(0.6 * n_entries):])
    print(f"  synthetic data: {time.perf_counter() - start:.1f} s, {np.mean([len(t) for t in texts[:10000]]):.0f} "
          "chars per text")
    gc.collect()
    gc.freeze()  # millions of strings: keep the cyclic GC from rescanning them in every timed loop
    try:
        records = _measure(entries, texts, workers)
    finally:
        gc.unfreeze()
    _print(records, n_entries)
    if getattr(args, "json", None):
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        print(f"\nwrote {len(records)} records to {args.json}")
    return 0 if all(r.get("identical", True) for r in records) else 1


def _timed(record: dict, fn, count: int) -> object:
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    record.update(texts_timed=count, seconds=round(seconds, 3), texts_per_s=count / seconds)
    return result


def _measure(entries: list[str], texts: list[str], workers: int) -> list[dict]:
    records = []
    if not cpp_available():
        print("  engine._C with kfe::MetaclipMatcher is not built: kfe-cpp rows skipped")
        truth = None
    else:
        cpp, rec = _build("kfe-cpp", lambda: Matcher(entries, backend="cpp"))
        rec["matcher_bytes"] = cpp.nbytes()
        flat, counts = _timed(rec, lambda: _flat_all(cpp, texts), len(texts))
        bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
        flat = flat.tolist()
        truth = [flat[a:b] for a, b in zip(bounds, bounds[1:])]
        records.append(rec)
        rec = {"provider": "kfe-cpp-lists", "matcher_bytes": cpp.nbytes()}
        batches = range(0, len(texts), _BATCH)
        lists = _timed(rec, lambda: [x for i in batches for x in cpp.match_batch(texts[i:i + _BATCH])], len(texts))
        rec["identical"] = lists == truth
        records.append(rec)
        records.append(_all_cores(cpp, texts, workers))
        del cpp
    py_n = min(len(texts), 200_000)
    py, rec = _build("kfe-python", lambda: Matcher(entries, backend="python"))
    rec["matcher_bytes"] = py.nbytes()
    got = _timed(rec, lambda: [py.match(t) for t in texts[:py_n]], py_n)
    truth = truth or got
    rec["identical"] = got == truth[:py_n]
    records.append(rec)
    del py
    try:
        off, rec = _build("official", lambda: OfficialMatcher(entries))
    except ImportError:
        print("  pyahocorasick is not installed: official row skipped")
    else:
        rec["matcher_bytes"] = off.nbytes()
        got = _timed(rec, lambda: [off.match(t) for t in texts], len(texts))
        rec["identical"] = [sorted(m) for m in got] == truth
        records.append(rec)
        del off
    ref_n = min(len(texts), max(10, int(2e6 / len(entries))))  # >= 10 texts, ~1-3 s of the definition
    rec = {"provider": "reference", "note": f"timed on the first {ref_n} texts, rate extrapolated"}
    got = _timed(rec, lambda: [match_reference(t, entries) for t in texts[:ref_n]], ref_n)
    rec["identical"] = got == truth[:ref_n]
    records.append(rec)
    ref_rate = rec["texts_per_s"]
    off_rate = next((r["texts_per_s"] for r in records if r["provider"] == "official"), None)
    for r in records:
        r["vs_reference"] = r["texts_per_s"] / ref_rate
        r["vs_official"] = r["texts_per_s"] / off_rate if off_rate else None
        r.setdefault("processes", 1)
        r["texts_per_s_per_core"] = r["texts_per_s"] / r["processes"]
        r.update(entries=len(entries), texts=len(texts), cpu=_cpu_name(), cores=os.cpu_count())
    return records


def _all_cores(matcher: Matcher, texts: list[str], workers: int) -> dict:
    rec = {"provider": f"kfe-cpp x{workers} processes", "processes": workers, "matcher_bytes": matcher.nbytes()}
    if workers < 2 or "fork" not in mp.get_all_start_methods():
        rec.update(texts_timed=0, seconds=0.0, texts_per_s=float("nan"), note="needs >= 2 workers and fork")
        return rec
    _STATE.update(matcher=matcher, texts=texts)
    step = -(-len(texts) // workers)
    slices = [(i, min(i + step, len(texts))) for i in range(0, len(texts), step)]
    with mp.get_context("fork").Pool(workers) as pool:
        pool.map(_slice_worker, [(0, min(len(texts), 1000))] * workers)  # start-up outside the timing
        _timed(rec, lambda: pool.map(_slice_worker, slices), len(texts))
    _STATE.clear()
    return rec


def _print(records: list[dict], n_entries: int) -> None:
    print("\n| provider | texts timed | texts/s | per core | vs reference | vs official | matcher memory | "
          "build s | identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        mem = f"{r['matcher_bytes'] / 2**20:.0f} MiB" if r.get("matcher_bytes") else "-"
        vs_off = f"{r['vs_official']:.2f}x" if r.get("vs_official") else "-"
        print(f"| {r['provider']} | {r['texts_timed']} | {r['texts_per_s']:,.0f} | {r['texts_per_s_per_core']:,.0f} | "
              f"{r['vs_reference']:,.0f}x | {vs_off} | {mem} | {r.get('build_s', '-')} | "
              f"{r.get('identical', 'truth')} |")
    for r in records:
        if r.get("note"):
            print(f"  {r['provider']}: {r['note']}")
    kfe = next((r for r in records if r["provider"] == "kfe-cpp"), None)
    if kfe:
        goals = [("texts/s per core >= 50k", kfe["texts_per_s"] >= 5e4),
                 ("vs reference >= 100x", kfe["vs_reference"] >= 100),
                 ("vs official >= 2x", (kfe["vs_official"] or 0) >= 2),
                 ("matcher memory < 2 GB", kfe["matcher_bytes"] < 2e9)]
        print(f"\n  goals at {n_entries} entries (kfe-cpp, one core): "
              + ", ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in goals))
