"""mae and dit resume exactly: every draw (masks, timesteps, noise, class dropout) comes from the
checkpointed RNG, and their seeded evaluations leave it untouched."""
import os

import pytest

from tests.train import test_dit, test_mae
from tests.train.util import metrics
from train.run import resolve_config, train


@pytest.mark.parametrize("recipe, tiny", [("dit", test_dit.TINY), ("mae", test_mae.TINY)])
def test_resume_from_a_checkpoint_matches_the_uninterrupted_run(tmp_path, recipe, tiny):
    args = ["--data", "shapes", *tiny, "--steps", "6", "--ckpt_every", "3", "--eval_every", "2", "--keep_ckpts", "0",
            "--deterministic", "--ema", "--ema_decay", "0.9"] + (["--probe_samples", "0"] if recipe == "mae" else [])
    ref = str(tmp_path / "ref")
    cfg, preset = resolve_config(recipe, overrides=[*args, "--out", ref])
    train(recipe, cfg, preset)
    cfg, preset = resolve_config(recipe, overrides=[*args, "--out", str(tmp_path / "resumed"),
                                                    "--resume", os.path.join(ref, "ckpt-00000003.pt")])
    summary = train(recipe, cfg, preset)
    curve = [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in metrics(cfg.out)]
    expected = [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in metrics(ref)][3:]
    assert [s for s, *_ in curve] == [4, 5, 6] and curve == expected     # exact float equality
    assert summary["eval"] == [{k: v for k, v in r.items() if k not in ("kind", "step")}
                               for r in metrics(ref, "eval")][-1]
