"""The fcmae recipe on the CPU: the loss falls, k-NN evaluation with its init baseline and chance, export in
the official checkpoint layout, exact resume through the shared trainer, evaluation that leaves the
training random stream alone, bad configs rejected before any model is built."""
import shutil

import pytest

import torch

import models
from tests.train.util import metrics
from train import checkpoint as ckpt
from train.cli import main as kfe_main
from train.run import evaluate_checkpoint, export_checkpoint, resolve_config, train

# One block per stage, 8..64 channels, a 32-wide decoder, 64 px (a 2x2 patch grid): ~50 ms per step here.
TINY = ["--data", "shapes", "--resolution", "64", "--model_kwargs", '{"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}',
        "--decoder_embed_dim", "32", "--batch_size", "16", "--num_workers", "0", "--progress", "false",
        "--shapes.val_size", "64", "--eval_batch_size", "64", "--probe_samples", "64", "--warmup_steps", "2",
        "--log_every", "1"]


def _train(out, *extra):
    cfg, preset = resolve_config("fcmae", overrides=[*TINY, "--out", str(out), *extra])
    return cfg, train("fcmae", cfg, preset)


def _curve(out):
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in metrics(out)]


def test_loss_falls_eval_and_export(tmp_path, capsys):
    # 16 images seen again every step (shapes.size = batch): the reconstruction loss must fall fast.
    cfg, summary = _train(tmp_path / "run", "--steps", "30", "--shapes.size", "16", "--lr", "5e-3",
                          "--init_baseline", "true")
    losses = [r["loss"] for r in metrics(cfg.out)]
    assert len(losses) == 30 and sum(losses[-10:]) / 10 < 0.88 * sum(losses[:3]) / 3, losses  # 1.0 -> ~0.83
    ev = summary["eval"]
    assert set(ev) == {"val_loss", "knn_top1", "linear_top1", "chance", "n", "train_n", "init_val_loss",
                       "init_knn_top1", "init_linear_top1"}
    assert ev["n"] == 64 and ev["train_n"] == 16 and 0 < ev["chance"] < 1
    assert ev["val_loss"] < 0.95 * ev["init_val_loss"]                      # held-out reconstruction improved
    out = capsys.readouterr().out
    assert "held-out masked-patch loss" in out and "k-NN top-1" in out and "linear probe" in out
    assert "(init " in out and "| chance " in out
    assert metrics(cfg.out)[-1]["tflops"] > 0                               # flops_per_sample is set

    sd = export_checkpoint(cfg.out, str(tmp_path / "w.pt"))                 # the official (Minkowski) layout
    assert "encoder.stages.0.0.dwconv.kernel" in sd and "encoder.stages.0.0.pwconv1.linear.weight" in sd
    fresh = models.create_model("fcmae_convnextv2_atto", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64),
                                decoder_embed_dim=32)
    fresh.load_state_dict(sd)                                               # strict: converted back on load
    trained = ckpt.load(ckpt.find_resume(cfg.out, "auto"))["model"]
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in trained.items())
    lin = evaluate_checkpoint(cfg.out, probe="linear", probe_samples=16)    # task.embed features
    assert 0 <= lin["linear_top1"] <= 1 and lin["train_n"] == 16


def test_resume_is_exact_and_evaluation_leaves_the_random_stream_alone(tmp_path):
    # The masks are random every step: resuming must restore that stream, and evaluations (which draw
    # their own masks and run data loaders) must not shift it.
    common = ["--steps", "6", "--ckpt_every", "3", "--keep_ckpts", "0", "--deterministic", "--drop_path", "0.1"]
    ref_cfg, _ = _train(tmp_path / "ref", *common, "--eval_every", "2")
    quiet_cfg, _ = _train(tmp_path / "quiet", *common, "--eval_every", "0")
    assert _curve(quiet_cfg.out) == _curve(ref_cfg.out)                     # exact equality

    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(ckpt.path_for(ref_cfg.out, 3), ckpt.path_for(str(cut), 3))  # as if killed after step 3
    cfg, summary = _train(cut, *common, "--eval_every", "2", "--resume", "auto")
    assert summary["session_steps"] == 3
    assert _curve(cfg.out) == _curve(ref_cfg.out)[3:]
    final_ref, final_cut = ckpt.load(ckpt.path_for(ref_cfg.out, 6)), ckpt.load(ckpt.path_for(cfg.out, 6))
    assert all(torch.equal(v, final_cut["model"][k]) for k, v in final_ref["model"].items())


def test_bad_config_fails_before_any_model_is_built(monkeypatch, capsys, tmp_path):
    built = []
    monkeypatch.setattr(models, "create_model", lambda *a, **k: built.append(a))
    assert kfe_main(["train", "fcmae", *TINY, "--out", str(tmp_path / "a"), "--resolution", "80"]) == 2
    assert "multiple of the 32 px FCMAE patch" in capsys.readouterr().err
    assert kfe_main(["train", "fcmae", *TINY, "--out", str(tmp_path / "b"), "--data", "/nonexistent/x"]) == 2
    assert "/nonexistent/x" in capsys.readouterr().err
    assert built == []


# ---- paper defaults and what the config reaches (built, not trained)

def test_paper_defaults():
    """ConvNeXt V2 Appendix A.1, Table 11 (ImageNet-1K FCMAE pre-training), as main_pretrain.py runs it."""
    cfg, preset = resolve_config("fcmae", overrides=["--data", "/data/imagenet"])
    assert preset == "paper" and cfg.model == "fcmae_convnextv2_base"
    assert (cfg.blr, cfg.weight_decay, tuple(cfg.betas), cfg.batch_size) == (1.5e-4, 0.05, (0.9, 0.95), 4096)
    assert (cfg.warmup_epochs, cfg.epochs, cfg.min_lr) == (40.0, 1600.0, 0.0)   # TRAINING.md: 1600 epochs
    assert (cfg.mask_ratio, cfg.norm_pix_loss, cfg.decoder_embed_dim, cfg.decoder_depth) == (0.6, True, 512, 1)
    assert cfg.crop_min_scale == 0.2 and cfg.resolution == 224 and cfg.drop_path == 0.0 and cfg.augment == "auto"
    assert not cfg.ema and cfg.clip_grad == 0.0


def test_optimizer_and_schedule_follow_the_config(tmp_path):
    from tests.train.util import built_trainer, group_names

    t = built_trainer("fcmae", tmp_path, *TINY, "--blr", "1e-3", "--batch_size", "32", "--steps", "20",
                      "--warmup_steps", "4", "--min_lr", "1e-5", "--weight_decay", "0.07", preset="paper")
    assert t.lr == pytest.approx(1e-3 * 32 / 256)                             # lr = blr * batch / 256
    assert (t.total_steps, t.warmup) == (20, 4) and t.optimizer.defaults["betas"] == (0.9, 0.95)
    (wd, decay), (no_wd, no_decay) = group_names(t)
    assert (wd, no_wd) == (0.07, 0.0)
    assert any(n.endswith("pwconv1.weight") for n in decay)
    assert any(n.endswith("grn.gamma") for n in no_decay) and any(n.endswith(".bias") for n in no_decay)
    assert not any(n.endswith(("grn.gamma", "grn.beta", ".bias")) for n in decay)   # the documented difference


def test_config_reaches_the_model(tmp_path):
    from tests.train.util import built_trainer

    t = built_trainer("fcmae", tmp_path, *TINY, "--mask_ratio", "0.5", "--norm_pix_loss", "false",
                      "--decoder_depth", "2", "--drop_path", "0.1")
    m = t.module
    assert m.mask_ratio == 0.5 and m.norm_pix_loss is False and len(m.decoder) == 2
    rates = [mod.p for mod in m.encoder.modules() if type(mod).__name__ == "SparseDropPath"]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)                 # linear in depth up to drop_path


def test_task_loss_is_the_models_masked_loss(tmp_path):
    from tests.train.util import built_trainer

    t = built_trainer("fcmae", tmp_path, *TINY)
    batch = t.prepare(next(iter(t.loader)))
    torch.manual_seed(5)
    loss, extra = t.task.loss(t.module, batch, 0)
    torch.manual_seed(5)
    want, pred, mask = t.module(batch["image"])
    assert extra == {} and torch.equal(loss, want) and 0 < float(loss)
    assert mask.float().mean() == pytest.approx(0.75)                         # 3 of 4 patches: L - int(L * 0.4)


def test_shapes_preset_is_the_documented_cpu_run():
    cfg, preset = resolve_config("fcmae", overrides=["--data", "shapes"])
    assert preset == "shapes" and cfg.resolution == 96 and cfg.model == "fcmae_convnextv2_atto"
    assert (cfg.batch_size, cfg.steps, cfg.blr, cfg.decoder_embed_dim) == (64, 800, 6e-3, 128)
    assert cfg.mask_ratio == 0.6 and cfg.norm_pix_loss and cfg.init_baseline   # the paper's masking and loss


def test_probe_samples_0_trains_and_evaluates_without_probes(tmp_path):
    # --probe_samples 0 = no probes (a pre-training stage measured only by its fine-tune): the held-out loss
    # still runs, over the whole held-out split (it used to read probe_samples images: none, then crashed).
    cfg, summary = _train(tmp_path / "run", "--steps", "2", "--probe_samples", "0")
    assert set(summary["eval"]) == {"val_loss", "init_val_loss"} and summary["eval"]["val_loss"] > 0  # no probes
