"""`kfe bench papers --smoke`: every registered paper's arms train and evaluate, the table / JSON / PNG
are written, a rerun reads finished runs back instead of retraining, and bad input fails clearly."""
import json
import os

import pytest

from train import cli
from train.papers import PAPERS, Arm, Paper, report


@pytest.mark.slow  # 7-36 s on the shared 2-core machine (load-dependent): every paper's arms train 4 steps
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
            assert 0.0 <= r["final"] <= 1.0
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


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="unknown paper"):
        cli.main(["bench", "papers", "nope", "--smoke", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--seeds"):
        cli.main(["bench", "papers", "slip", "--smoke", "--seeds", "a,b", "--out", str(tmp_path)])
