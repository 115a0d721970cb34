"""The mae recipe on the CPU: the loss falls, long-sequence mask units, the self-supervised probes."""
import pytest
import torch

from tests.train.util import metrics
from train.cli import main as kfe_main
from train.config import ConfigError
from train.run import evaluate_checkpoint, resolve_config, train

# A 2-block MAE (dim 32, patch 8: 16 tokens at 32 px), ~20 ms per step of 16 images here.
TINY = ["--resolution", "32", "--model", "mae_vit_base", "--batch_size", "16", "--num_workers", "0",
        "--model_kwargs", '{"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 32, '
                          '"decoder_depth": 1, "decoder_num_heads": 2}',
        "--progress", "false", "--shapes.val_size", "64", "--eval_batch_size", "64", "--warmup_steps", "2",
        "--log_every", "1", "--probe_samples", "64", "--eval_samples", "64"]


def _train(out, *extra):
    cfg, preset = resolve_config("mae", overrides=["--data", "shapes", *TINY, "--out", str(out), *extra])
    return cfg, train("mae", cfg, preset)


def test_paper_defaults():
    cfg, preset = resolve_config("mae", overrides=["--data", "/data/imagenet"])
    assert preset == "paper" and cfg.model == "mae_vit_large" and cfg.betas == (0.9, 0.95)
    assert (cfg.blr, cfg.weight_decay, cfg.batch_size, cfg.warmup_epochs) == (1.5e-4, 0.05, 4096, 40.0)
    assert cfg.mask_ratio == 0.75 and cfg.norm_pix_loss and cfg.crop_min_scale == 0.2 and cfg.augment == "auto"


def test_loss_falls_and_the_encoder_is_probed(tmp_path, capsys):
    # 16 images seen again every step: the reconstruction loss must fall.
    cfg, summary = _train(tmp_path / "run", "--steps", "40", "--shapes.size", "16", "--lr", "3e-3")
    losses = [r["loss"] for r in metrics(cfg.out)]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    ev = summary["eval"]
    for key in ("recon_loss", "knn_top1", "linear_top1", "chance", "pixel_knn_top1", "pixel_linear_top1"):
        assert 0 <= ev[key] <= 10, key
    assert ev["n"] == 64 and ev["probe_train_n"] == 16   # the whole 16-image train split
    out = capsys.readouterr().out
    assert "encoder k-NN" in out and "(chance " in out and "raw pixels: k-NN" in out
    # the recipe's features through `kfe eval --probe`: (B, embed_dim) from the unmasked encoder
    knn = evaluate_checkpoint(cfg.out, probe="knn", probe_samples=16)
    assert knn["knn_top1"] == pytest.approx(ev["knn_top1"])    # same features, same 16 training images
    assert kfe_main(["eval", cfg.out, "--probe", "linear", "--probe_samples", "16"]) == 0
    assert "held-out linear top-1" in capsys.readouterr().out


def test_evaluation_masks_are_fixed_and_leave_training_randomness_alone(tmp_path):
    from train.recipes import get
    from train.trainer import Trainer

    cfg, _ = resolve_config("mae", overrides=["--data", "shapes", *TINY, "--out", str(tmp_path), "--steps", "1",
                                              "--probe_samples", "0"])
    t = Trainer(get("mae"), cfg)
    t.setup(checkpoints=False)
    state = torch.get_rng_state()
    first, second = t.evaluate(0), t.evaluate(0)
    assert first == second and "knn_top1" not in first
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("pool", ["cls", "mean", "grid", "tokens"])
def test_probe_features_are_the_unmasked_encoders(tmp_path, pool):
    from train.recipes import get
    from train.trainer import Trainer

    cfg, _ = resolve_config("mae", overrides=["--data", "shapes", *TINY, "--out", str(tmp_path), "--steps", "1",
                                              "--feature_pool", pool])
    t = Trainer(get("mae"), cfg)
    t.setup(checkpoints=False)
    batch = t.prepare(next(iter(t.loader)))
    tokens = t.module.forward_features(batch["image"])           # (B, 1 + 16, 32): every patch, no mask
    feats = t.task.embed(t.module, batch)
    assert tokens.shape == (16, 17, 32)
    if pool in ("grid", "tokens"):  # 4 x 4 patches (= the 4 x 4 grid): every patch token in raster order
        assert torch.equal(feats, tokens[:, 1:].reshape(16, 16 * 32))
    else:
        assert feats.shape == (16, 32)
        assert torch.equal(feats, tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1))


def test_grid_features_average_each_cell_in_place():
    from train.recipes.mae import grid_features

    # an 8 x 8 token map whose token (r, c) is [r, c]: the 4 x 4 grid's cell (i, j) averages rows 2i, 2i + 1
    # and columns 2j, 2j + 1, so it holds [2i + 0.5, 2j + 0.5], in raster order of the cells
    rc = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1).reshape(1, 64, 2)
    cells = grid_features(rc, 4).view(4, 4, 2)
    i, j = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    assert torch.equal(cells, torch.stack([2 * i + 0.5, 2 * j + 0.5], -1))
    with pytest.raises(ValueError, match="not a square grid divisible by 4"):
        grid_features(torch.zeros(1, 36, 2), 4)


def test_long_sequence_mask_units(tmp_path):
    # patch 4 at 32 px (8 x 8 patches), mask units of 2 x 2 patches (8 px): kept patches form whole units.
    kw = '{"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}'
    cfg, summary = _train(tmp_path / "run", "--steps", "3", "--model_kwargs", kw, "--mask_unit", "8",
                          "--probe_samples", "0")
    from train.recipes import get
    from train.trainer import Trainer

    t = Trainer(get("mae"), cfg)
    t.setup(checkpoints=False)
    assert t.module.unit == 2
    _, _, mask = t.module(torch.randn(4, 3, 32, 32))
    units = mask.view(4, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(4, 16, 4)  # (B, unit, patch in unit)
    assert (units.min(-1).values == units.max(-1).values).all() and (mask == 0).sum(1).eq(16).all()
    assert all(r["loss"] == r["loss"] for r in metrics(cfg.out))  # finite
    bad, _ = resolve_config("mae", overrides=["--data", "shapes", *TINY, "--out", str(tmp_path / "b"),
                                              "--mask_unit", "12"])
    with pytest.raises(ValueError, match="mask_unit .12 px. must be a multiple of patch_size .8."):
        train("mae", bad)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="img_size"):
        _train(tmp_path / "a", "--model_kwargs", '{"img_size": 64}')
    with pytest.raises(ConfigError, match="mask_ratio"):
        _train(tmp_path / "b", "--mask_ratio", "1.0")


# ---- what the config reaches (built, not trained)

def test_paper_defaults_reach_the_optimizer_and_the_model(tmp_path):
    """MAE Table 8 through the trainer: lr = 1.5e-4 * batch / 256, betas (0.9, 0.95), weight decay 0.05 off
    norms and biases (and off the frozen sin-cos positions) but on cls_token / mask_token, as
    main_pretrain.py's add_weight_decay (only 1-D parameters and biases exempt); the model regresses
    normalised pixels of 75 % removed patches."""
    from tests.train.util import built_trainer, group_names

    t = built_trainer("mae", tmp_path, "--data", "shapes", *TINY, "--batch_size", "32", preset="paper")
    assert t.lr == pytest.approx(1.5e-4 * 32 / 256) and t.optimizer.defaults["betas"] == (0.9, 0.95)
    (wd, decay), (no_wd, no_decay) = group_names(t)
    assert (wd, no_wd) == (0.05, 0.0)
    assert {"blocks.0.attn.qkv.weight", "decoder_pred.weight", "cls_token", "mask_token"} <= decay
    assert {"blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "decoder_norm.bias"} <= no_decay
    assert "pos_embed" not in decay | no_decay and "decoder_pos_embed" not in decay | no_decay   # frozen
    assert t.module.norm_pix_loss and t.module.mask_ratio == 0.75 and t.cfg.min_lr == 0.0


def test_task_loss_is_the_models_loss_on_the_batch(tmp_path):
    from tests.train.util import built_trainer

    t = built_trainer("mae", tmp_path, "--data", "shapes", *TINY, "--mask_ratio", "0.5", "--norm_pix_loss", "false")
    assert t.module.mask_ratio == 0.5 and not t.module.norm_pix_loss
    batch = t.prepare(next(iter(t.loader)))
    torch.manual_seed(2)
    loss, _ = t.task.loss(t.module, batch, 0)
    torch.manual_seed(2)
    want, _, mask = t.module(batch["image"])
    assert torch.equal(loss, want) and mask.mean() == 0.5
