"""`kfe bench recipe supervised` runs and reports loader and training images/s separately."""
import json

from train.cli import main as kfe_main


def test_bench_recipe_reports_loader_and_training_throughput(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert kfe_main(["bench", "recipe", "supervised", "--sizes", "32x8", "--warmup", "1", "--repeats", "2",
                     "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| loader img/s | train img/s | e2e img/s | data % |" in table
    (rec,) = json.loads(out.read_text())
    assert rec["recipe"] == "supervised" and rec["model"] == "convnextv2_atto" and rec["resolution"] == 32
    assert rec["loader_images_per_s"] > 0 and rec["train_images_per_s"] > 0 and 0 <= rec["data_frac"] < 1
    assert rec["train_flops_per_image"] > 0
    assert kfe_main(["bench", "--list"]) == 0 and "recipe" in capsys.readouterr().out
