"""A paper's results: per-arm mean and spread over seeds, the effect against the baseline arm, and
NAME.md (table), NAME.json (every run's curve) and NAME.png (metric vs steps, every arm) in OUT.
Files are written to a temporary name and renamed, so an interrupted run never leaves half a table."""
from __future__ import annotations

import json
import math
import os
import statistics

from train.papers import Paper


def _stats(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(paper: Paper, runs: list[dict]) -> dict:
    arms = {}
    for arm in paper.arms:
        mine = [r for r in runs if r["arm"] == arm.name]
        mean, std = _stats([r["final"] for r in mine])
        entry = {"final_mean": mean, "final_std": std, "seeds": [r["seed"] for r in mine],
                 "finals": [r["final"] for r in mine], "steps": mine[0]["steps"] if mine else 0}
        if paper.probe is not None:
            entry["probe_mean"], entry["probe_std"] = _stats([r["probe"]["top1"] for r in mine])
        if paper.score_columns:
            entry["scores"] = {key: _stats([r["score"].get(key, math.nan) for r in mine if "score" in r])
                               for key, _, _ in paper.score_columns}
        arms[arm.name] = entry
    effects = {}
    for arm in paper.arms[1:]:
        base = arm.baseline or paper.arms[0].name
        a, b = arms[arm.name], arms[base]
        eff = {"metric_delta": a["final_mean"] - b["final_mean"],
               "metric_spread": max(a["final_std"], b["final_std"])}
        if paper.probe is not None:
            eff["probe_delta"] = a["probe_mean"] - b["probe_mean"]
            eff["probe_spread"] = max(a["probe_std"], b["probe_std"])
        if paper.score_columns:
            eff["scores"] = {key: (a["scores"][key][0] - b["scores"][key][0],
                                   max(a["scores"][key][1], b["scores"][key][1])) for key, _, _ in paper.score_columns}
        effects[f"{arm.name} - {base}"] = eff
    chance = {"metric": next((r["chance"] for r in runs if r.get("chance") is not None), None),
              "probe": next((r["probe"].get("chance") for r in runs if "probe" in r), None)}
    pretrain = {}  # per pre-training stage: its recipe, steps and final training loss over seeds
    for arm in paper.arms:
        mine = [r["pretrain"] for r in runs if r["arm"] == arm.name and "pretrain" in r]
        if mine and arm.pretrain.name not in pretrain:
            mean, std = _stats([p["final_loss"] for p in mine])
            pretrain[arm.pretrain.name] = {"recipe": arm.pretrain.recipe, "steps": mine[0]["steps"],
                                           "final_loss_mean": mean, "final_loss_std": std, "arms": []}
            for key in ("knn_top1", "linear_top1"):  # the pre-training recipe's own probes, if it ran them
                values = [p.get("eval", {}).get(key) for p in mine]
                if all(v is not None for v in values):
                    pretrain[arm.pretrain.name][key] = _stats(values)
        if mine:
            pretrain[arm.pretrain.name]["arms"].append(arm.name)
    out = {"paper": paper.name, "title": paper.title, "claim": paper.claim, "metric": paper.metric,
           "notes": paper.notes, "arms": arms, "effects": effects, "chance": chance, "percent": paper.percent}
    if paper.score_columns:
        out["score_columns"] = [list(c) for c in paper.score_columns]
    if pretrain:
        out["pretrain"] = pretrain
    if paper.analyze is not None:
        out["analysis"], out["analysis_md"] = paper.analyze(runs)
    return out


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def _verdict(delta: float, spread: float) -> str:
    if math.isnan(delta):
        return "n/a"
    if abs(delta) <= spread:
        return "within seed spread"
    return "higher" if delta > 0 else "lower"


def markdown(summary: dict, command: str) -> str:
    probe = any("probe_mean" in a for a in summary["arms"].values())
    lines = [f"# {summary['title']}", "", f"Paper's finding: {summary['claim']}.", "",
             f"Command: `{command}`", ""]
    if summary["notes"]:
        lines += [f"Notes: {summary['notes']}.", ""]
    for name, p in summary.get("pretrain", {}).items():
        lines += [f"Pre-training `{name}`: `kfe train {p['recipe']}`, {p['steps']} steps per seed, final training "
                  f"loss {p['final_loss_mean']:.4f} ± {p['final_loss_std']:.4f}"
                  + "".join(f", its {what} probe {_pct(p[key][0])} ± {_pct(p[key][1])}%"
                            for what, key in (("k-NN", "knn_top1"), ("linear", "linear_top1")) if key in p)
                  + f"; {', '.join(p['arms'])} start from its weights (`--init`).", ""]
    pct = summary.get("percent", True)  # an accuracy (shown in %), or a value shown as it is (e.g. a loss)
    val = _pct if pct else (lambda x: "n/a" if x is None or math.isnan(x) else f"{x:.4f}")
    head = (f"| arm | steps | seeds | {summary['metric']}{' %' if pct else ''} (mean ± std) |"
            + (" linear probe % |" if probe else ""))
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for name, a in summary["arms"].items():
        row = (f"| {name} | {a['steps']} | {','.join(map(str, a['seeds']))} | "
               f"{val(a['final_mean'])} ± {val(a['final_std'])} |")
        if probe:
            row += f" {_pct(a['probe_mean'])} ± {_pct(a['probe_std'])} |"
        lines.append(row)
    lines += ["", f"| effect | metric Δ{' (points)' if pct else ''} | vs seed spread |"
              + (" probe Δ | vs spread |" if probe else ""),
              "|---|---|---|" + ("---|---|" if probe else "")]
    for name, e in summary["effects"].items():
        delta = f"{100 * e['metric_delta']:+.1f}" if pct else f"{e['metric_delta']:+.4f}"
        row = f"| {name} | {delta} | {_verdict(e['metric_delta'], e['metric_spread'])} |"
        if probe:
            row += f" {100 * e['probe_delta']:+.1f} | {_verdict(e['probe_delta'], e['probe_spread'])} |"
        lines.append(row)
    lines += _score_tables(summary)
    chance = summary.get("chance") or {}
    if chance.get("metric") is not None:
        lines += ["", f"Chance (majority class of the held-out set): {summary['metric']} {_pct(chance['metric'])}%"
                  + (f", probe {_pct(chance['probe'])}%" if chance.get("probe") is not None else "") + "."]
    lines += summary.get("analysis_md", [])
    lines += ["", f"![{summary['paper']}]({summary['paper']}.png)", ""]
    return "\n".join(lines)


def _score_tables(summary: dict) -> list[str]:
    """The scores of each arm (mean ± std over seeds) and each effect's score differences."""
    columns = summary.get("score_columns")
    if not columns:
        return []

    def fmt(x: float, pct: bool, sign: str = "") -> str:
        return "n/a" if math.isnan(x) else f"{100 * x if pct else x:{sign}.{1 if pct else 2}f}"

    lines = ["", "| arm | " + " | ".join(head for _, head, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, a in summary["arms"].items():
        lines.append(f"| {name} | " + " | ".join(
            f"{fmt(a['scores'][k][0], pct)} ± {fmt(a['scores'][k][1], pct)}" for k, _, pct in columns) + " |")
    lines += ["", "| effect | " + " | ".join(f"{head} Δ" for _, head, _ in columns) + " |",
              "|---" * (len(columns) + 1) + "|"]
    for name, e in summary["effects"].items():
        lines.append(f"| {name} | " + " | ".join(
            f"{fmt(e['scores'][k][0], pct, '+')} ({_verdict(*e['scores'][k])})" for k, _, pct in columns) + " |")
    return lines


def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def plot(summary: dict, runs: list[dict], path: str, extra=None) -> None:
    """The metric against steps, every run; `extra(ax, runs)` draws a second panel beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if extra is None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
    else:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
        extra(ax2, runs)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    pct = summary.get("percent", True)
    for i, name in enumerate(summary["arms"]):
        for j, r in enumerate(r for r in runs if r["arm"] == name):
            if r["curve"]:
                xs, ys = zip(*r["curve"])
                ys = [100 * y for y in ys] if pct else ys
                ax.plot(xs, ys, color=colors[i % len(colors)], marker="o", markersize=3,
                        alpha=0.8, label=name if j == 0 else None)
    if not pct:
        ax.set_yscale("log")  # losses of different models can differ by orders of magnitude
    ax.set_xlabel("step")
    ax.set_ylabel(f"{summary['metric']}" + (" (%)" if pct else ""))
    ax.set_title(summary["title"], fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def write(summary: dict, runs: list[dict], out: str, command: str, extra_plot=None) -> list[str]:
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, summary["paper"])
    _write(base + ".json", json.dumps({**summary, "command": command, "runs": runs}, indent=1) + "\n")
    _write(base + ".md", markdown(summary, command))
    plot(summary, runs, base + ".png", extra_plot)
    return [base + ".md", base + ".json", base + ".png"]
