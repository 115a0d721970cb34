"""The `papers` suite of `kfe bench`: `kfe bench papers [NAME ...] [--smoke] [--seeds 0,1] [--out DIR]`."""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

from train.papers import PAPERS

RESULTS = os.path.join("benchmarks", "results", "papers")


def add_bench_arguments(bench: argparse.ArgumentParser) -> None:
    g = bench.add_argument_group("papers suite (kfe bench papers [NAME ...])")
    g.add_argument("--smoke", action="store_true", help="papers: a few steps per arm (seconds; CI)")
    g.add_argument("--seeds", help="papers: comma-separated seeds (default: each paper's)")
    g.add_argument("--out", metavar="DIR", help=f"papers: tables/plots folder (default {RESULTS}; "
                                                "--smoke: a temporary folder)")
    g.add_argument("--runs", metavar="DIR", help="papers: run folders (default runs/papers; --smoke: under --out)")


def _seeds(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise SystemExit(f"--seeds: expected comma-separated integers, got {text!r}") from None


def check(summary: dict, runs: list[dict]) -> list[str]:
    """Every run trained its planned steps (> 0), ended with a finite loss and evaluated its metric."""
    problems = []
    for r in runs:
        what = f"{summary['paper']}/{r['arm']}/seed{r['seed']}"
        if r["steps"] <= 0 or r["steps"] != r.get("planned_steps", r["steps"]):
            problems.append(f"{what}: trained {r['steps']} steps, planned {r.get('planned_steps')}")
        if not r["curve"] or math.isnan(r["final"]):
            problems.append(f"{what}: no {summary['metric']} evaluation")
        if r["final_loss"] is None or not math.isfinite(r["final_loss"]):
            problems.append(f"{what}: no finite training loss")
        if "probe" in r and not 0.0 <= r["probe"]["top1"] <= 1.0:
            problems.append(f"{what}: probe top-1 {r['probe']['top1']}")
    return problems


def run(args: argparse.Namespace, device=None) -> int:
    from tqdm import tqdm

    from train.papers import report, runner

    names = getattr(args, "papers", None) or list(PAPERS)
    unknown = [n for n in names if n not in PAPERS]
    if unknown:
        raise SystemExit(f"kfe bench papers: unknown paper(s) {unknown}; available: {', '.join(PAPERS)}")
    smoke = bool(getattr(args, "smoke", False))
    out = getattr(args, "out", None) or (tempfile.mkdtemp(prefix="kfe-papers-smoke-") if smoke else RESULTS)
    runs_dir = getattr(args, "runs", None) or (os.path.join(out, "runs") if smoke else os.path.join("runs", "papers"))
    seeds_arg = _seeds(getattr(args, "seeds", None))
    status = 0
    for name in names:
        paper = PAPERS[name]
        seeds = seeds_arg or ((0,) if smoke else paper.seeds)
        jobs = [(arm, s) for s in seeds for arm in paper.arms]
        paths = paper.prepare(os.path.join(runs_dir, name, "data"), smoke) if paper.prepare else None
        results = []
        for arm, seed in tqdm(jobs, desc=f"papers {name}", unit="run", file=sys.stderr, dynamic_ncols=True):
            results.append(runner.run_arm(paper, arm, seed, runs_dir, smoke=smoke, paths=paths))
        summary = report.summarize(paper, results)
        command = (f"kfe bench papers {name}" + (" --smoke" if smoke else "")
                   + f" --seeds {','.join(map(str, seeds))}")
        files = report.write(summary, results, out, command, paper.plot_extra)
        print(report.markdown(summary, command))
        print(f"wrote {', '.join(files)}", file=sys.stderr)
        problems = check(summary, results)
        for p in problems:
            print(f"kfe bench papers: {p}", file=sys.stderr)
        status |= bool(problems)
    return int(status)
