"""Train a paper's arms x seeds in-process (train.run) and collect their metric-vs-steps curves.

Each run lives in RUNS/PAPER/ARM/seedS. A finished run (its metrics.jsonl ends with a summary at the full
step count) is read back, not retrained; an interrupted one resumes from its newest checkpoint. So a
rerun of `kfe bench papers` after a crash continues where it stopped.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os

from train.papers import Arm, Paper, Stage

# Smoke mode: a few steps on a tiny split, every evaluation on a few images (seconds per arm).
SMOKE = ("--steps", "4", "--eval_every", "2", "--log_every", "2", "--ckpt_every", "1000", "--batch_size", "16",
         "--num_workers", "0", "--eval_batch_size", "64", "--shapes.size", "128", "--shapes.val_size", "48",
         "--warmup_steps", "1", "--progress", "false")
SMOKE_EXTRA = {"mae": ("--probe_samples", "64", "--eval_samples", "48"),
               "cit": ("--curate_every", "2"),
               "clip": ("--vocab_samples", "128"), "slip": ("--vocab_samples", "128"),
               "fcmae": ("--probe_samples", "64"), "maskfeat": ("--probe_samples", "64")}


def _records(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash
                break
    return out


def _finished(records: list[dict], steps: int) -> dict | None:
    for r in reversed(records):
        if r.get("kind") == "summary":
            return r if r["step"] >= steps and r["step"] == r["total_steps"] else None
    return None


def arm_overrides(paper: Paper, arm: Arm, seed: int, run_dir: str, smoke: bool) -> list[str]:
    base = ["--seed", str(seed), "--out", run_dir, "--steps", str(paper.steps), "--eval_every",
            str(paper.eval_every), "--resume", "auto", *paper.common, *arm.overrides]
    if smoke:
        base += [*SMOKE, *SMOKE_EXTRA.get(arm.recipe, ())]
    return base


def _train_or_read(recipe: str, overrides: list[str], run_dir: str, quiet: bool) -> tuple[dict, list[dict], int]:
    """(summary, metric records, planned steps) of a run: read back when finished, else trained / resumed."""
    from train.run import resolve_config, train

    cfg, preset = resolve_config(recipe, preset="shapes", overrides=overrides)
    records = _records(run_dir)
    summary = _finished(records, cfg.steps)
    if summary is None:
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            summary = train(recipe, cfg, preset)
        records = _records(run_dir)
    return summary, records, cfg.steps


def run_stage(paper: Paper, stage: Stage, seed: int, runs: str, smoke: bool = False, quiet: bool = True) -> dict:
    """Pre-train (or read back) a Stage at one seed, without evaluations (the arms after it are measured)."""
    run_dir = os.path.join(runs, paper.name, f"pretrain-{stage.name}", f"seed{seed}")
    overrides = ["--seed", str(seed), "--out", run_dir, "--resume", "auto", *paper.common, *stage.overrides]
    if stage.steps:
        overrides += ["--steps", str(stage.steps)]
    if smoke:
        overrides += [*SMOKE, *SMOKE_EXTRA.get(stage.recipe, ())]
    overrides += ["--eval_every", "0"]  # the recipe's own evaluation (probes) only at the end
    summary, records, _ = _train_or_read(stage.recipe, overrides, run_dir, quiet)
    evals = [r for r in records if r.get("kind") == "eval"]
    return {"stage": stage.name, "recipe": stage.recipe, "run_dir": run_dir, "steps": summary["step"],
            "final_loss": summary.get("final_loss"), "eval": evals[-1] if evals else {}}


def run_arm(paper: Paper, arm: Arm, seed: int, runs: str, smoke: bool = False, quiet: bool = True,
            paths: dict[str, str] | None = None) -> dict:
    """Train (or read back) one arm at one seed: {"curve": [(step, metric)], "final", "probe", ...}.
    An arm with a pre-training Stage trains (or reads back) the stage first and starts from its weights."""
    from train.run import evaluate_checkpoint

    run_dir = os.path.join(runs, paper.name, arm.name, f"seed{seed}")
    overrides = arm_overrides(paper, arm, seed, run_dir, smoke)
    paths = dict(paths or {})
    if arm.prepare is not None:
        paths.update(arm.prepare(os.path.join(runs, paper.name), seed, smoke))
    for key, value in paths.items():
        overrides = [o.replace(key, value) for o in overrides]
    pre = None
    if arm.pretrain is not None:
        pre = run_stage(paper, arm.pretrain, seed, runs, smoke, quiet)
        overrides += ["--init", pre["run_dir"]]
    summary, records, planned = _train_or_read(arm.recipe, overrides, run_dir, quiet)
    sink = io.StringIO()
    curve = [(r["step"], float(r[paper.metric])) for r in records
             if r.get("kind") == "eval" and paper.metric in r]
    curve = sorted(dict(curve).items())  # a resumed run may repeat a step: keep the last value
    out = {"arm": arm.name, "seed": seed, "run_dir": run_dir, "planned_steps": planned, "steps": summary["step"],
           "session_steps": summary["session_steps"], "final_loss": summary.get("final_loss"),
           "curve": curve, "final": curve[-1][1] if curve else math.nan,
           "chance": next((r["chance"] for r in reversed(records) if r.get("kind") == "eval" and "chance" in r),
                          None)}
    if pre is not None:
        out["pretrain"] = pre
    if paper.probe is not None:
        probe_path = os.path.join(run_dir, "probe.json")
        out["probe"] = _read_json(probe_path)
        if out["probe"] is None:
            extra = ["--eval_batch_size", "64"] if smoke else []
            with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
                m = evaluate_checkpoint(run_dir, "linear", overrides=[*paper.probe, *extra],
                                        probe_samples=64 if smoke else 2000)
            out["probe"] = {"top1": m["linear_top1"], "chance": m["chance"]}
            _write_json(probe_path, out["probe"])
    if paper.score is not None:
        score_path = os.path.join(run_dir, "score.json")
        cached = _read_json(score_path)
        # A score is for one checkpoint: a run trained further (or retrained) since is scored again.
        if cached is None or cached.get("step") != out["steps"]:
            with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
                cached = {"step": out["steps"], **paper.score(out, smoke, paths)}
            _write_json(score_path, cached)
        out["score"] = cached
    return out


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, value: dict) -> None:
    from train.papers.report import _write  # temporary name + rename: never half a file to read back

    _write(path, json.dumps(value))
