"""`kfe bench recipe NAME` runs for every registered recipe and reports loader and training images/s
separately."""
import json

import pytest

import train.recipes  # noqa: F401  (registers the built-in recipes)
from train.bench import settings_for
from train.cli import main as kfe_main
from train.recipes.base import RECIPES


# Every recipe counts its training FLOPs (vlpart measures a training forward: train/recipes/vlpart.py).
UNCOUNTED: set[str] = set()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_bench_recipe_reports_loader_and_training_throughput(name, tmp_path, capsys):
    # Every recipe names its benchmark models (a recipe without them got the ConvNeXt defaults, which
    # crashed in DiT's, MAE's and FCMAE's configs); timed here with its own model at tiny sizes.
    assert RECIPES[name].bench is not None, f"recipe {name} defines no bench settings (Recipe.bench)"
    model, res, _, _ = settings_for(name, "cpu")[0]
    res = min(res, 32)
    out = tmp_path / "bench.json"
    assert kfe_main(["bench", "recipe", name, "--sizes", f"{res}x8", "--warmup", "1", "--repeats", "1",
                     "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| loader img/s | train img/s | e2e img/s | data % |" in table
    (rec,) = json.loads(out.read_text())
    assert rec["recipe"] == name and rec["resolution"] == res and rec["batch"] == 8
    if model is not None:
        assert rec["model"] == model
    assert rec["loader_images_per_s"] > 0 and rec["train_images_per_s"] > 0 and 0 <= rec["data_frac"] < 1
    if name in UNCOUNTED:  # no FLOP count, so no TFLOP/s or MFU column: never a made-up figure
        assert rec["train_flops_per_image"] is None and "tflops" not in rec
    else:
        assert rec["train_flops_per_image"] > 0


def test_bench_without_settings_times_the_recipes_own_model(tmp_path, monkeypatch):
    """A recipe without Recipe.bench (a user's own) gets DEFAULTS with its own model, not a ConvNeXt."""
    monkeypatch.setattr(RECIPES["dit"], "bench", None)
    out = tmp_path / "bench.json"
    assert kfe_main(["bench", "recipe", "dit", "--sizes", "16x8", "--warmup", "1", "--repeats", "1",
                     "--json", str(out)]) == 0
    (rec,) = json.loads(out.read_text())
    assert rec["model"] == "dit_s_2" and rec["train_images_per_s"] > 0


def test_bench_lists_the_recipe_suite(capsys):
    assert kfe_main(["bench", "--list"]) == 0 and "recipe" in capsys.readouterr().out


def test_train_and_e2e_are_timed_in_interleaved_blocks():
    """Load on a shared machine must hit both timings alike: blocks alternate, medians are reported."""
    from types import SimpleNamespace

    from train import bench

    calls = []

    def step(batches, s):
        calls.append((next(batches), s))
        return {"images": 8, "data_time": 0.0}

    t = SimpleNamespace(step=step, device=SimpleNamespace(type="cpu"))
    held, fed = iter(lambda: "held", None), iter(lambda: "fed", None)
    train_ips, e2e_ips, data = bench._time_steps(t, held, fed, n=7, warmup=1)
    order = "".join("h" if which == "held" else "f" for which, _ in calls)
    assert order == "hf" + "hhff" + "hhff" + "hf" * 3        # warm-up, then 5 blocks of 2, 2, 1, 1, 1 steps
    assert [s for _, s in calls] == list(range(16))         # every step numbered once, in order
    assert train_ips > 0 and e2e_ips > 0 and data == 0.0
