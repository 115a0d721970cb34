"""`kfe bench papers --smoke`: every registered paper's arms train and evaluate, the table / JSON / PNG
are written, a rerun reads finished runs back instead of retraining, and bad input fails clearly."""
import json
import os

import pytest
import torch

from train import cli
from train.papers import PAPERS, Arm, Paper, Stage, report


@pytest.mark.slow  # 20-50 s on the shared 2-core machine (load-dependent): every paper's arms train 4 steps
def test_smoke_every_paper_trains_evaluates_and_reports(tmp_path, capsys):
    out = str(tmp_path / "papers")
    assert cli.main(["bench", "papers", "--smoke", "--out", out]) == 0
    for name, paper in PAPERS.items():
        with open(os.path.join(out, f"{name}.json")) as f:
            result = json.load(f)
        assert {r["arm"] for r in result["runs"]} == {a.name for a in paper.arms}
        for r in result["runs"]:
            assert r["steps"] == 4 and r["session_steps"] == 4, r  # it trained, in this session
            assert r["curve"] and [s for s, _ in r["curve"]] == [2, 4]  # and evaluated along the way
            assert 0.0 <= r["final"] <= 1.0 if paper.percent else r["final"] >= 0.0  # an accuracy, or a loss
        with open(os.path.join(out, f"{name}.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        md = open(os.path.join(out, f"{name}.md")).read()
        assert all(f"| {a.name} | 4 |" in md for a in paper.arms) and f"--smoke --seeds 0" in md
        assert not [p for p in os.listdir(out) if p.endswith(".tmp") or ".tmp." in p]
    assert "# SLIP vs CLIP" in capsys.readouterr().out

    # A rerun reads the finished runs back: no run trains again, the tables are the same.
    before = open(os.path.join(out, "slip.json")).read()
    log = os.path.join(out, "runs", "slip", "clip", "seed0", "metrics.jsonl")
    lines = open(log).read()
    assert cli.main(["bench", "papers", "slip", "--smoke", "--out", out]) == 0
    assert open(log).read() == lines
    assert json.loads(open(os.path.join(out, "slip.json")).read())["arms"] == json.loads(before)["arms"]

    # Pre-train -> fine-tune arms: each stage trained once per seed, its run dir the arms' --init; a rerun
    # reads the stage and the arms back.
    for name in ("mae", "convnextv2", "maskfeat"):
        paper, result = PAPERS[name], json.load(open(os.path.join(out, f"{name}.json")))
        for arm in paper.arms:
            run = next(r for r in result["runs"] if r["arm"] == arm.name)
            init = open(os.path.join(run["run_dir"], "config.toml")).read().split("init = ")[1].split("\n")[0]
            if arm.pretrain is None:
                assert init == '""' and "pretrain" not in run
            else:
                stage = os.path.join(out, "runs", name, f"pretrain-{arm.pretrain.name}", "seed0")
                assert init == f'"{stage}"' and run["pretrain"]["run_dir"] == stage and run["pretrain"]["steps"] == 4
                assert result["pretrain"][arm.pretrain.name]["steps"] == 4
    stage_log = os.path.join(out, "runs", "mae", "pretrain-mae", "seed0", "metrics.jsonl")
    lines = open(stage_log).read()
    assert cli.main(["bench", "papers", "mae", "--smoke", "--out", out]) == 0
    assert open(stage_log).read() == lines


def test_smoke_check_flags_an_arm_that_did_not_train():
    paper = PAPERS["slip"]
    runs = [{"arm": a.name, "seed": 0, "steps": 0 if a.name == "slip" else 4, "final_loss": 1.0,
             "curve": [(4, 0.5)], "final": 0.5, "probe": {"top1": 0.5}} for a in paper.arms]
    from train.papers.bench import check

    assert check(report.summarize(paper, runs), runs) == ["slip/slip/seed0: trained 0 steps, planned None"]


def test_summary_effect_and_spread():
    paper = Paper("p", "t", "c", (Arm("a", "clip"), Arm("b", "clip")), "top1", 10, 5)
    runs = [{"arm": "a", "seed": s, "steps": 10, "final": v, "curve": []} for s, v in ((0, 0.5), (1, 0.7))]
    runs += [{"arm": "b", "seed": s, "steps": 10, "final": v, "curve": []} for s, v in ((0, 0.8), (1, 0.8))]
    s = report.summarize(paper, runs)
    assert s["arms"]["a"]["final_mean"] == pytest.approx(0.6)
    e = s["effects"]["b - a"]
    assert e["metric_delta"] == pytest.approx(0.2) and e["metric_spread"] == pytest.approx(0.1414, abs=1e-3)
    assert "higher" in report.markdown(s, "cmd")


def test_effects_use_each_arms_baseline_and_pretraining_is_summarised():
    stage = Stage("pre", "mae")
    paper = Paper("p", "t", "c", (Arm("a", "finetune"), Arm("b", "finetune", pretrain=stage, baseline="c"),
                                  Arm("c", "finetune")), "top1", 10, 5)
    pre = {"stage": "pre", "recipe": "mae", "run_dir": "x", "steps": 7, "final_loss": 0.5, "eval": {"knn_top1": 0.25}}
    runs = [{"arm": n, "seed": 0, "steps": 10, "final": v, "curve": [], **({"pretrain": pre} if n == "b" else {})}
            for n, v in (("a", 0.5), ("b", 0.9), ("c", 0.6))]
    s = report.summarize(paper, runs)
    assert set(s["effects"]) == {"b - c", "c - a"} and s["effects"]["b - c"]["metric_delta"] == pytest.approx(0.3)
    assert s["pretrain"]["pre"]["steps"] == 7 and s["pretrain"]["pre"]["arms"] == ["b"]
    assert "Pre-training `pre`: `kfe train mae`, 7 steps" in report.markdown(s, "cmd")
    assert "its k-NN probe 25.0 ± 0.0%; b start from" in report.markdown(s, "cmd")


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="unknown paper"):
        cli.main(["bench", "papers", "nope", "--smoke", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--seeds"):
        cli.main(["bench", "papers", "slip", "--smoke", "--seeds", "a,b", "--out", str(tmp_path)])


def test_offtopic_pool_names_the_evaluation_classes_in_a_fifth_of_its_captions(tmp_path):
    # CiT's pool (train/papers/pools.py): on-topic = a caption naming a colour (the zero-shot classes).
    from train.data.shapes import COLOR_NAMES
    from train.data.webdataset import _caption, iter_tar
    from train.papers import pools

    paths = pools.offtopic_pool(str(tmp_path / "pool"), n=240, shards=2, resolution=16)
    texts = [_caption(parts) for p in paths for _, _, parts in iter_tar(p)]
    assert len(texts) == 240 and pools.offtopic_pool(str(tmp_path / "pool"), n=240, shards=2) == paths  # reused
    on = [t for t in texts if set(t.split()) & set(COLOR_NAMES)]
    assert 0.12 < len(on) / 240 < 0.28
    colourless = [t for t in texts if t not in on and t.startswith("a ")]
    assert 0.3 < len(colourless) / 240 < 0.5
    assert pools.colourless("a large striped red triangle above a small blue circle") == \
        "a large striped triangle above a small circle"


def test_longtail_pool_head_dominates_and_order_names_it(tmp_path):
    from train.data.shapes import COLOR_NAMES
    from train.data.webdataset import _caption, iter_tar
    from train.papers import pools

    paths = pools.longtail_pool(str(tmp_path / "pool"), n=240, shards=1, resolution=16)
    words = [w for p in paths for _, _, parts in iter_tar(p) for w in _caption(parts).split()]
    counts = [words.count(COLOR_NAMES[c]) for c in pools.longtail_order()]
    assert counts[0] > 0.5 * sum(counts) and counts[0] > 3 * counts[1] and counts[-1] < 0.05 * sum(counts)


def test_steps_to_reach_and_head_tail_analysis(tmp_path):
    from train.papers.clip_family import head_and_tail, steps_to_reach
    from train.papers.pools import longtail_order

    runs = [{"arm": "clip", "seed": 0, "steps": 400, "final": 0.8, "curve": [(200, 0.5), (400, 0.8)]},
            {"arm": "cit", "seed": 0, "steps": 400, "final": 0.9, "curve": [(20, 0.3), (40, 0.79), (60, 0.8)]},
            {"arm": "clip", "seed": 1, "steps": 400, "final": 0.9, "curve": [(400, 0.9)]},
            {"arm": "cit", "seed": 1, "steps": 400, "final": 0.85, "curve": [(400, 0.85)]}]
    data, lines = steps_to_reach(runs, "clip", "cit")
    assert [(x["steps"], x["ratio"]) for x in data["steps_to_reach"]] == [(60, 400 / 60), (None, None)]
    assert data["ratios"] == [400 / 60] and any("6.7x" in line for line in lines)
    assert any("not reached" in line for line in lines)

    order = longtail_order()
    acc = [0.0] * 8
    for c in order[:4]:
        acc[c] = 1.0  # head colours all right, tail all wrong
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 4, "top1": 0.5,
                                                       "class_top1": acc}) + "\n")
    data, lines = head_and_tail([{"arm": "raw", "seed": 0, "run_dir": str(run_dir)}])
    assert data["head_tail"]["raw"]["head"]["mean"] == 1.0 and data["head_tail"]["raw"]["tail"]["mean"] == 0.0
    s = report.summarize(PAPERS["cit"], runs)
    assert s["analysis"]["ratios"] == [400 / 60] and "Steps cit needs" in report.markdown(s, "cmd")


def test_channel_cosine_distance_is_zero_for_collapsed_channels_and_matches_a_loop():
    from train.papers.finetune_papers import channel_cosine_distance

    same = torch.rand(2, 3, 3, 1).expand(2, 3, 3, 5)             # every channel the same map: collapsed
    assert channel_cosine_distance(same) == pytest.approx(0.0, abs=1e-12)
    a = torch.randn(2, 4, 3, 6, generator=torch.Generator().manual_seed(0))
    ref = []
    for img in a:                                                # the paper's formula, one pair at a time
        maps = img.reshape(12, 6).T
        ref.append(sum((1 - torch.nn.functional.cosine_similarity(maps[i], maps[j], dim=0)) / 2
                       for i in range(6) for j in range(6)) / 36)
    assert channel_cosine_distance(a) == pytest.approx(float(sum(ref) / 2), rel=1e-6)
