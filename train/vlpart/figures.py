"""Collect the shapes-parts figures of VLPart runs into benchmarks/results/vlpart-shapes-parts.{json,md}.

    python -m train.vlpart.figures OUT_STEM seed:BASE_RUN:PARSED_RUN:STEP [...]

Both runs have the same schedule; the comparison is at the same STEP: BASE_RUN's held-out evaluation
at STEP from its metrics.jsonl, PARSED_RUN's eval.json from `kfe eval PARSED_RUN/ckpt-<STEP>.pt`.
BASE_RUN also has parsed.stats.json / parsed-pixels.stats.json (from `kfe vlpart parse`).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time

import numpy as np

KEYS = ("segm_base_parts_AP50", "segm_novel_parts_AP50", "segm_objects_AP50", "segm_base_parts_AP",
        "segm_novel_parts_AP", "bbox_novel_parts_AP50")


def _load(path):
    with open(path) as f:
        return json.load(f)


def collect(specs: list[str]) -> dict:
    rows = []
    for spec in specs:
        seed, base, parsed, step = spec.split(":")
        with open(os.path.join(base, "metrics.jsonl")) as f:
            evals = [r for r in map(json.loads, f) if r["kind"] == "eval" and r["step"] == int(step)]
        row = {"seed": int(seed), "step": int(step), "without": evals[-1],
               "with": _load(os.path.join(parsed, "eval.json"))}
        for kind in ("parsed", "parsed-pixels"):
            p = os.path.join(base, f"{kind}.stats.json")
            if os.path.isfile(p):
                row[kind] = _load(p)
        rows.append(row)
    mean = {f"{cond}_{k}": float(np.mean([r[cond][k] for r in rows]))
            for cond in ("without", "with") for k in KEYS}
    for kind in ("parsed", "parsed-pixels"):
        q = [r[kind]["quality"]["mean_iou"] for r in rows if kind in r and "quality" in r[kind]]
        if q:
            mean[f"{kind}_mean_iou"] = float(np.mean(q))
    return {"rows": rows, "mean": mean, "machine": platform.node(), "date": time.strftime("%Y-%m-%d")}


def markdown(doc: dict) -> str:
    m = doc["mean"]
    lines = ["| seed | step | base-part AP50 | novel-part AP50 without parsed parts | "
             "novel-part AP50 with parsed parts | object AP50 (with) | parsing mIoU: backbone / pixels |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in doc["rows"]:
        q = [f"{r[k]['quality']['mean_iou']:.2f}" if k in r else "-"
             for k in ("parsed", "parsed-pixels")]
        lines.append(f"| {r['seed']} | {r['step']} | {r['without']['segm_base_parts_AP50']:.1f} | "
                     f"{r['without']['segm_novel_parts_AP50']:.1f} | {r['with']['segm_novel_parts_AP50']:.1f} | "
                     f"{r['with']['segm_objects_AP50']:.1f} | {q[0]} / {q[1]} |")
    lines.append(f"| mean | | {m['without_segm_base_parts_AP50']:.1f} | {m['without_segm_novel_parts_AP50']:.1f} | "
                 f"{m['with_segm_novel_parts_AP50']:.1f} | {m['with_segm_objects_AP50']:.1f} | "
                 f"{m.get('parsed_mean_iou', float('nan')):.2f} / "
                 f"{m.get('parsed-pixels_mean_iou', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    stem, specs = argv[0], argv[1:]
    doc = collect(specs)
    with open(stem + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    md = markdown(doc)
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
