"""The dit recipe on the CPU: the loss falls, held-out loss, latent shards, `kfe sample dit`."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import models
from tests.train.util import metrics
from train.cli import main as kfe_main
from train.run import resolve_config, train
from train.sample import GAP, sample

# A 1-block DiT (hidden 32, patch 4: 16 tokens at 16 px), a few ms per step of 16 images.
TINY = ["--resolution", "16", "--model", "dit_s_4", "--model_kwargs", '{"hidden_size": 32, "depth": 1, "num_heads": 2}',
        "--batch_size", "16", "--num_workers", "0", "--progress", "false", "--shapes.val_size", "32",
        "--eval_batch_size", "32", "--eval_samples", "32", "--warmup_steps", "2", "--log_every", "1"]


def _train(out, *extra):
    cfg, preset = resolve_config("dit", overrides=["--data", "shapes", *TINY, "--out", str(out), *extra])
    return cfg, train("dit", cfg, preset)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run trained once for the sampling tests (EMA on, class dropout 0.1: CFG works)."""
    out = tmp_path_factory.mktemp("dit") / "run"
    torch.manual_seed(0)
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        _train(out, "--steps", "40", "--shapes.size", "16", "--lr", "3e-3", "--ema_decay", "0.9")
    return str(out)


def test_paper_defaults():
    cfg, preset = resolve_config("dit", overrides=["--data", "/data/imagenet"])
    assert preset == "paper" and cfg.model == "dit_xl_2" and cfg.batch_size == 256 and cfg.steps == 400_000
    assert (cfg.lr, cfg.min_lr, cfg.weight_decay, cfg.warmup_steps) == (1e-4, 1e-4, 0.0, 0)  # constant lr
    assert cfg.ema and cfg.ema_decay == 0.9999 and cfg.class_dropout == 0.1 and cfg.learn_sigma
    assert cfg.diffusion_steps == 1000 and cfg.augment == "flip"


def test_loss_falls_and_held_out_loss(run_dir):
    recs = metrics(run_dir)
    losses = [r["loss"] for r in recs]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    (ev,) = metrics(run_dir, "eval")
    assert ev["n"] == 32 and ev["loss"] == pytest.approx(ev["mse"] + ev["vb"], rel=1e-5)
    assert 0 < ev["mse"] < 1.0 and ev["vb"] > 0 and "ema_loss" in ev
    assert recs[-1]["tflops"] > 0


def test_evaluation_is_seeded_and_leaves_training_randomness_alone(tmp_path):
    from train.recipes import get
    from train.trainer import Trainer

    cfg, _ = resolve_config("dit", overrides=["--data", "shapes", *TINY, "--out", str(tmp_path), "--steps", "1"])
    t = Trainer(get("dit"), cfg)
    t.setup(checkpoints=False)
    state = torch.get_rng_state()
    assert t.evaluate(0) == t.evaluate(0)
    assert torch.equal(state, torch.get_rng_state())
    m = t.module
    assert (m.in_channels, m.x_embedder.img_size, m.num_classes, m.out_channels) == (3, 16, 8, 6)
    assert m.y_embedder.embedding_table.num_embeddings == 9   # + the null class


def test_training_loss_feeds_noised_images_timesteps_and_labels(tmp_path):
    from train.recipes import get
    from train.trainer import Trainer

    cfg, _ = resolve_config("dit", overrides=["--data", "shapes", *TINY, "--out", str(tmp_path), "--steps", "1"])
    t = Trainer(get("dit"), cfg)
    t.setup(checkpoints=False)
    batch = t.prepare(next(iter(t.loader)))
    assert -1 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1   # pixels scaled to [-1, 1]
    seen = {}

    def spy(x, tt, y):
        seen.update(x=x, t=tt, y=y)
        return torch.zeros(x.shape[0], 6, *x.shape[2:])

    loss, extra = t.task.loss(spy, batch, 0)
    assert torch.equal(seen["y"], batch["label"]) and seen["t"].min() >= 0 and seen["t"].max() < 1000
    assert not torch.allclose(seen["x"], batch["image"]) and seen["t"].unique().numel() > 1
    assert float(extra["mse"]) == pytest.approx(1.0, abs=0.1)   # zero epsilon against unit noise
    assert float(loss) == pytest.approx(float(extra["mse"] + extra["vb"]), rel=1e-5)


@pytest.mark.parametrize("sampler, cfg_scale", [("ddpm", 4.0), ("ddim", 1.0), ("ddim", 2.0), ("ddpm", 1.0)])
def test_sample_writes_a_grid_of_the_right_size(run_dir, tmp_path, sampler, cfg_scale, capsys):
    out = str(tmp_path / "grid.png")
    assert kfe_main(["sample", "dit", "--ckpt", run_dir, "--out", out, "--steps", "4", "--sampler", sampler,
                     "--cfg-scale", str(cfg_scale), "--classes", "red,3", "--per-class", "3", "--upscale", "2",
                     "--quiet"]) == 0
    img = np.asarray(Image.open(out))
    assert img.shape == (2 * (2 * (16 + GAP) + GAP), 2 * (3 * (16 + GAP) + GAP), 3)   # 2 rows x 3, upscaled 2x
    caption = open(str(tmp_path / "grid.txt")).read()
    assert "row 0: class 0 (red)" in caption and "row 1: class 3 (green)" in caption
    assert "EMA weights" in caption and f"cfg scale {cfg_scale}" in caption and f"{sampler} 4 steps" in caption
    assert "wrote " in capsys.readouterr().out


def test_sampling_is_seeded_and_uses_ema(run_dir, tmp_path):
    kw = dict(steps=3, classes="0", per_class=2, progress=False)
    a = sample(run_dir, str(tmp_path / "a.png"), seed=1, **kw)
    b = sample(run_dir, str(tmp_path / "b.png"), seed=1, **kw)
    c = sample(run_dir, str(tmp_path / "c.png"), seed=2, **kw)
    raw = sample(run_dir, str(tmp_path / "d.png"), seed=1, ema=False, **kw)
    assert torch.equal(a["samples"], b["samples"]) and not torch.equal(a["samples"], c["samples"])
    assert a["ema"] and not raw["ema"] and not torch.equal(a["samples"], raw["samples"])
    assert a["samples"].shape == (2, 3, 16, 16) and a["samples"].abs().max() <= 1


def test_classifier_free_guidance_mixes_conditional_and_null_predictions(run_dir):
    from train.sample import guided, load_model

    model, _, _, _ = load_model(run_dir)
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([10, 500, 990]), torch.tensor([0, 4, 7])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 8))
        out = guided(model, y, 3.0)(x, t)
        assert torch.allclose(out[:, :3], uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3]), atol=1e-5)
        assert torch.allclose(out[:, 3:], cond[:, 3:], atol=1e-6)       # the conditional variance
        assert torch.equal(guided(model, y, 1.0)(x, t), cond)
    assert (cond - uncond).abs().max() > 0                               # the label matters


def test_sample_errors(run_dir, tmp_path, capsys):
    def cmd(ckpt, *extra):
        return kfe_main(["sample", "dit", "--ckpt", ckpt, "--out", str(tmp_path / "g.png"), "--steps", "2", "--quiet",
                         *extra])

    assert cmd(run_dir, "--classes", "hexagonal") == 2
    assert "'hexagonal' is neither a class index nor a class name" in capsys.readouterr().err
    assert cmd(run_dir, "--classes", "8") == 2 and "out of range" in capsys.readouterr().err
    assert cmd(str(tmp_path / "none")) == 2 and "no such checkpoint" in capsys.readouterr().err
    cfg, _ = _train(tmp_path / "nocfg", "--steps", "1", "--class_dropout", "0", "--ema", "false")
    assert cmd(cfg.out, "--cfg-scale", "3") == 2 and "class dropout" in capsys.readouterr().err
    assert cmd(cfg.out, "--cfg-scale", "1") == 0 and "raw weights" in capsys.readouterr().out


# ---------------------------------------------------------------- latents

def _write_latent_shards(d, c=4, s=8):
    """Three shards in the three formats, 5 + 6 + 7 samples, labels 0..2; returns (latents, labels)."""
    os.makedirs(d, exist_ok=True)
    g = np.random.default_rng(0)
    lat = [g.standard_normal((n, c, s, s)).astype(np.float32) for n in (5, 6, 7)]
    lab = [np.arange(n) % 3 for n in (5, 6, 7)]
    np.save(os.path.join(d, "a.npy"), lat[0])
    np.save(os.path.join(d, "a.labels.npy"), lab[0])
    np.savez(os.path.join(d, "b.npz"), latents=lat[1], labels=lab[1])
    torch.save({"latents": torch.from_numpy(lat[2]), "labels": torch.from_numpy(lab[2])}, os.path.join(d, "c.pt"))
    return np.concatenate(lat), np.concatenate(lab)


def test_latent_shards_train_and_sample(tmp_path):
    from train.data import latents as latents_mod
    from train.recipes import get
    from train.trainer import Trainer

    lat, lab = _write_latent_shards(str(tmp_path / "lat"))
    ds, base = latents_mod.open_latents(str(tmp_path / "lat"), 0)
    assert len(ds) == 18 and base.sample_shape == (4, 8, 8) and base.num_classes == 3
    for i in (0, 4, 5, 10, 11, 17):
        assert np.array_equal(ds[(0, i)]["image"].numpy(), lat[i]) and ds[(0, i)]["label"] == lab[i]
    assert len(latents_mod.open_latents(str(tmp_path / "lat" / "{a,b}.np*"), 0)[0]) == 11   # brace + glob

    over = ["--data", str(tmp_path / "lat"), "--val_data", str(tmp_path / "lat" / "b.npz"), *TINY,
            "--batch_size", "6", "--steps", "3", "--latent_scale", "0.5", "--out", str(tmp_path / "run")]
    cfg, preset = resolve_config("dit", overrides=over)
    t = Trainer(get("dit"), cfg)
    t.setup(checkpoints=False)
    assert (t.module.in_channels, t.module.x_embedder.img_size, t.module.num_classes) == (4, 8, 3)
    batch = t.prepare(next(iter(t.loader)))  # floating-point "images" are not normalised
    assert batch["image"].dtype == torch.float32 and any(
        np.array_equal(batch["image"][0].numpy(), x) for x in lat)
    summary = train("dit", cfg, preset)
    assert summary["eval"]["n"] == 6 and summary["step"] == 3
    res = sample(cfg.out, str(tmp_path / "lat.png"), steps=3, classes="0,2", per_class=2, progress=False)
    saved = np.load(str(tmp_path / "lat.npy"))
    assert saved.shape == (4, 4, 8, 8) and np.allclose(saved, res["samples"].numpy() / 0.5)
    assert np.asarray(Image.open(str(tmp_path / "lat.png"))).shape == (2 * (8 + GAP) + GAP, 2 * (8 + GAP) + GAP, 3)


@pytest.mark.parametrize("case, message", [
    ("shape", "differs from"), ("labels", "some latent shards have labels"), ("ndim", "must be .N, C, H, W."),
    ("square", "must be square"), ("badlabels", "labels must be"), ("none", "names no latent shards")])
def test_bad_latent_shards_fail_before_any_model(tmp_path, monkeypatch, capsys, case, message):
    d = tmp_path / "lat"
    d.mkdir()
    z = np.zeros((4, 4, 8, 8), np.float32)
    np.savez(d / "a.npz", latents=z, labels=np.zeros(4, np.int64))
    if case == "shape":
        np.savez(d / "b.npz", latents=np.zeros((4, 4, 6, 6), np.float32), labels=np.zeros(4, np.int64))
    elif case == "labels":
        np.save(d / "b.npy", z)
    elif case == "ndim":
        np.save(d / "a.npy", z[0])
        (d / "a.npz").unlink()
    elif case == "square":
        np.savez(d / "a.npz", latents=np.zeros((4, 4, 8, 6), np.float32))
    elif case == "badlabels":
        np.savez(d / "a.npz", latents=z, labels=np.zeros(3, np.int64))
    spec = str(d / "missing_*.npy") if case == "none" else str(d)
    built = []
    monkeypatch.setattr(models, "create_model", lambda *a, **k: built.append(a))
    code = kfe_main(["train", "dit", *TINY, "--data", spec, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert built == [] and code == 2
    assert __import__("re").search(message, err), err


def test_recipe_train_step_from_a_non_zero_init_reaches_every_parameter(tmp_path):
    """The dit task's diffusion loss (L_simple + L_vlb) off the adaLN-Zero start: every trainable parameter
    gets a non-zero gradient, and one AdamW step through the built trainer lowers the loss on the same
    batch, noise and timesteps. (From adaLN-Zero itself: tests/models/test_all_models.py.)"""
    from tests.train.util import built_trainer

    t = built_trainer("dit", tmp_path, "--data", "shapes", *TINY, "--lr", "1e-3", "--steps", "1")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in t.module.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    batch = t.prepare(next(iter(t.loader)))

    def loss():
        torch.manual_seed(1)                                      # the same timesteps, noise, label drops
        value, extra = t.task.loss(t.module, batch, 0)
        return value, extra

    before, extra = loss()
    assert float(extra["vb"]) > 0 and float(extra["mse"]) > 0
    t.optimizer.zero_grad(set_to_none=True)
    before.backward()
    for n, p in t.module.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert not t.module.pos_embed.requires_grad                  # DiT's fixed sin-cos positions
    t.optimizer.step()
    after, _ = loss()
    assert float(after) < float(before)
