"""The supervised recipe end to end on the CPU: loss falls, evaluation, export with official keys,
`kfe eval`, bad WebDataset samples counted in the metrics, missing data rejected before any model."""
import json
import os

import pytest
import torch

import models
from tests.train.util import TINY, metrics, write_shards
from train.cli import main as kfe_main
from train.config import parse_overrides
from train.run import evaluate_checkpoint, export_checkpoint, resolve_config, train


def _train(out, *extra):
    cfg, preset = resolve_config("supervised", overrides=["--data", "shapes", *TINY, "--out", str(out), *extra])
    return cfg, train("supervised", cfg, preset)


def test_loss_falls_then_eval_export_and_probe(tmp_path, capsys):
    # 16 images seen again every step (shapes.size = batch): the loss must fall fast.
    cfg, summary = _train(tmp_path / "run", "--steps", "30", "--shapes.size", "16", "--lr", "5e-3",
                          "--eval_every", "15", "--ckpt_every", "15")
    losses = [r["loss"] for r in metrics(cfg.out)]
    assert len(losses) == 30 and sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3, losses
    line = capsys.readouterr().out
    assert "held-out top-1" in line and "(chance " in line and "kfe train supervised: done at step 30/30" in line
    rec = metrics(cfg.out)[-1]
    for key in ("step", "loss", "lr", "grad_norm", "images_per_s", "data_time_s", "skipped", "mem_gb", "tflops"):
        assert key in rec, key
    evals = metrics(cfg.out, "eval")
    assert [e["step"] for e in evals] == [15, 30] and evals[-1]["n"] == 64
    assert summary["eval"] == {k: v for k, v in evals[-1].items() if k not in ("kind", "step")}
    assert sorted(os.listdir(cfg.out)) == ["ckpt-00000015.pt", "ckpt-00000030.pt", "config.toml", "metrics.jsonl"]

    sd = export_checkpoint(cfg.out, str(tmp_path / "w.safetensors"))
    official = models.create_model("convnextv2_atto", num_classes=8, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
    assert list(sd) == list(official.state_dict())
    official.load_state_dict(sd)              # plain state dict, official keys, loads strictly

    metrics_eval = evaluate_checkpoint(cfg.out)
    assert metrics_eval["top1"] == pytest.approx(evals[-1]["top1"])
    knn = evaluate_checkpoint(cfg.out, probe="knn", probe_samples=64)
    assert 0 <= knn["knn_top1"] <= 1 and knn["train_n"] == 16   # the whole (16-image) train split
    assert "held-out knn top-1" in capsys.readouterr().out
    assert kfe_main(["eval", cfg.out, "--probe", "top1", "--num_workers", "0"]) == 0   # options + overrides
    assert "(step 30): held-out top-1" in capsys.readouterr().out
    assert kfe_main(["eval", cfg.out, "--nope", "1"]) == 2 and "unknown key 'nope'" in capsys.readouterr().err
    assert kfe_main(["export", cfg.out, str(tmp_path / "w.pt")]) == 0
    assert list(torch.load(tmp_path / "w.pt")) == list(sd)


def test_webdataset_training_counts_bad_samples(tmp_path):
    write_shards(str(tmp_path / "shards"), shards=2, per_shard=8, corrupt=[(0, 3)], no_caption=[(1, 1)], label=True)
    spec = str(tmp_path / "shards" / "{00000..00001}.tar")
    cfg, summary = _train(tmp_path / "run", "--data", spec, "--val_data", spec, "--num_classes", "3", "--steps", "3",
                          "--batch_size", "4", "--augment", "rrc")
    last = metrics(cfg.out)[-1]
    assert last["skipped"]["corrupt_image"] >= 1 and last["skipped_total"] >= 1
    assert summary["eval"]["n"] == 15                      # 16 samples, one undecodable


@pytest.mark.parametrize("flag, value", [("--data", "/nonexistent/imagenet"),
                                         ("--data", "/nonexistent/{000..009}.tar"),
                                         ("--val_data", "/nonexistent/val")])
def test_missing_data_fails_before_any_model_or_file(monkeypatch, capsys, tmp_path, flag, value):
    built = []
    monkeypatch.setattr(models, "create_model", lambda *a, **k: built.append(a))
    out = tmp_path / "run"
    code = kfe_main(["train", "supervised", *TINY, "--out", str(out), flag, value])
    err = capsys.readouterr().err
    assert code == 2 and value.split("{")[0] in err and "Expected 'shapes'" in err
    assert built == [] and not out.exists()   # nothing built, nothing written (not even the run directory)


def test_config_saved_in_run_dir_reloads(tmp_path):
    cfg, _ = _train(tmp_path / "run", "--steps", "1", "--shapes.label", "color")
    import tomllib

    with open(os.path.join(cfg.out, "config.toml"), "rb") as f:
        saved = tomllib.load(f)
    again, _ = resolve_config("supervised", os.path.join(cfg.out, "config.toml"), "paper")
    assert again == cfg and saved["shapes"]["label"] == "color"
    assert json.loads(json.dumps(parse_overrides(type(cfg), ["--shapes.seed", "3"]))) == {"shapes": {"seed": 3}}


def test_gradient_clipping_and_the_logged_pre_clip_norm(tmp_path):
    from train.recipes import get
    from train.trainer import Trainer

    cfg, _ = resolve_config("supervised", overrides=["--data", "shapes", *TINY, "--out", str(tmp_path),
                                                     "--clip_grad", "0.05", "--steps", "2"])  # noqa: E127
    t = Trainer(get("supervised"), cfg)
    t.setup(checkpoints=False)
    seen = []  # the norm of the gradient the optimizer actually applies
    t.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(
        float(torch.stack([p.grad.norm() for p in t.module.parameters()]).norm())))
    out = t.step(iter(t.loader), 0)
    assert float(out["grad_norm"]) > 0.05 and seen[0] == pytest.approx(0.05, rel=1e-4)


def test_vit_trains_at_any_resolution_and_knn_probes_its_cls_token(tmp_path):
    """A ViT at 32 px (not its 224 default): built for --resolution; `kfe eval --probe knn` pools its tokens."""
    vit = ["--model", "vit_small_patch16", "--model_kwargs",
           '{"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}']
    cfg, summary = _train(tmp_path / "run", *vit, "--steps", "3", "--shapes.size", "16")
    assert summary["step"] == 3 and len(metrics(cfg.out)) == 3 and "top1" in summary["eval"]
    knn = evaluate_checkpoint(cfg.out, probe="knn", probe_samples=16)
    assert 0 <= knn["knn_top1"] <= 1 and knn["n"] == 64 and knn["train_n"] == 16
    # the probe's features are the cls token the classifier reads
    from train.config import ConfigError
    from train.run import load_for_eval

    _, _, _, task, module, prepare, _, _ = load_for_eval(cfg.out)
    batch = prepare({"image": torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)})
    with torch.no_grad():
        feats = task.embed(module, batch)
        assert feats.shape == (2, 32)
        torch.testing.assert_close(module.head(feats), module(batch["image"]))
    with pytest.raises(ConfigError, match="use --resolution"):
        _train(tmp_path / "bad", *vit[:2], "--model_kwargs", '{"img_size": 32}', "--steps", "1")
