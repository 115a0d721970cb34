"""`kfe train maskfeat` on the CPU: the loss falls on shapes images and moving-shapes clips, probes with
chance, resumed runs draw the same masks, frame-folder clips, bad data rejected before any model."""
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import models
from tests.train.util import metrics
from train.cli import main as kfe_main
from train.data import normalize
from train.data.clips import FrameFolder, MovingShapes, make_clip_transform
from train.recipes.maskfeat import StepMasks
from train.run import resolve_config, train

TINY = ["--model_kwargs", '{"embed_dim": 32, "depth": 1, "num_heads": 2}', "--resolution", "32", "--batch_size", "16",
        "--num_workers", "0", "--progress", "false", "--shapes.val_size", "64", "--eval_batch_size", "64",
        "--warmup_steps", "2", "--log_every", "1", "--probe_samples", "64", "--probe_epochs", "20", "--lr", "5e-3"]


def _train(out, *extra):
    cfg, preset = resolve_config("maskfeat", overrides=["--data", "shapes", *TINY, "--out", str(out), *extra])
    return cfg, train("maskfeat", cfg, preset)


def _falls(run_dir):
    losses = [r["loss"] for r in metrics(run_dir)]
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
    return losses


def test_images_loss_falls_and_probes_print_chance(tmp_path, capsys):
    cfg, summary = _train(tmp_path / "run", "--steps", "25", "--shapes.size", "32")
    _falls(cfg.out)
    ev = summary["eval"]
    for key in ("val_loss", "val_loss_floor", "knn_top1", "linear_top1", "chance"):
        assert key in ev, key
    assert ev["n"] == 64 and ev["train_n"] == 32 and 0 < ev["chance"] < 1
    out = capsys.readouterr().out
    assert "held-out MaskFeat loss" in out and "k-NN top-1" in out and "(chance " in out
    assert cfg.model == "maskfeat_vit_small" and cfg.mask_ratio == 0.4   # the shapes preset's model


def test_video_clips_loss_falls(tmp_path):
    cfg, summary = _train(tmp_path / "run", "--num_frames", "4", "--steps", "25", "--shapes.size", "32",
                          "--probe", "knn")
    _falls(cfg.out)
    assert "knn_top1" in summary["eval"] and "linear_top1" not in summary["eval"]


def test_resume_draws_the_same_masks(tmp_path):
    a, _ = _train(tmp_path / "a", "--steps", "4", "--ckpt_every", "2", "--probe", "none")
    os.makedirs(tmp_path / "b")
    shutil.copy(os.path.join(a.out, "ckpt-00000002.pt"), tmp_path / "b")
    b, _ = _train(tmp_path / "b", "--steps", "4", "--ckpt_every", "2", "--probe", "none", "--resume", "auto")
    assert [r["loss"] for r in metrics(b.out)] == [r["loss"] for r in metrics(a.out)][2:]   # bit-exact
    masks = StepMasks(0, 0)
    model = models.create_model("maskfeat_vit_base", img_size=64, embed_dim=32, depth=1, num_heads=2)
    first, again = masks(model, 8, 5, "cpu"), masks(model, 8, 5, "cpu")       # micro-batches 0 and 1
    assert not torch.equal(first, again) and torch.equal(StepMasks(0, 0)(model, 8, 5, "cpu"), first)
    assert not torch.equal(StepMasks(0, 1)(model, 8, 5, "cpu"), first)       # another rank, other masks


def _frames(root, classes=2, clips=2, frames=6, size=32):
    for c in range(classes):
        for k in range(clips):
            d = os.path.join(root, f"class{c}", f"clip{k}")
            os.makedirs(d)
            for f in range(frames):
                Image.fromarray(np.full((size, size, 3), 20 * f + 100 * c, np.uint8)).save(f"{d}/{f:03d}.png")


def test_frame_folder_clips_train_and_evaluate(tmp_path):
    _frames(str(tmp_path / "vid" / "train"))
    _frames(str(tmp_path / "vid" / "val"))
    cfg, summary = _train(tmp_path / "run", "--data", str(tmp_path / "vid"), "--num_frames", "2", "--frame_stride",
                          "2", "--steps", "2", "--batch_size", "4", "--probe_samples", "4")
    assert summary["step"] == 2 and summary["eval"]["n"] == 4 and summary["eval"]["train_n"] == 4


def test_clip_transform_takes_strided_frames_with_one_crop():
    clip = [np.full((8, 8, 3), 10 * f, np.uint8) for f in range(6)]
    rng = np.random.default_rng(0)
    ev = make_clip_transform(8, frames=2, stride=2, augment="none")(clip, rng)
    assert ev.shape == (3, 2, 8, 8) and ev[0, :, 0, 0].tolist() == [10, 30]     # centred window: frames 1, 3
    short = make_clip_transform(8, frames=4, stride=1, augment="none")(clip[:3], rng)
    assert short[0, :, 0, 0].tolist() == [0, 10, 20, 20]                         # repeats the last frame
    starts = {int(make_clip_transform(8, 2, 2, "flip")(clip, np.random.default_rng(s))[0, 0, 0, 0]) // 10
              for s in range(40)}
    assert starts == {0, 1, 2, 3}                                                # random starts in training
    ramp = [np.tile(np.arange(8, dtype=np.uint8)[None, :, None] * 30, (8, 1, 3))] * 3
    for s in range(8):  # flipped or not, all frames alike
        out = make_clip_transform(8, 3, 1, "flip")(ramp, np.random.default_rng(s))
        assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])


def test_moving_shapes_start_as_the_shapes_image_and_move():
    from train.data.shapes import Shapes

    clip = MovingShapes("val", 10, frames=3, resolution=32)[4]["image"]          # (T, H, W, 3)
    assert np.array_equal(clip[0], Shapes("val", 10, 32)[4]["image"]) and not np.array_equal(clip[0], clip[2])
    assert np.array_equal(clip, MovingShapes("val", 10, frames=3, resolution=32)[4]["image"])  # deterministic


def test_normalize_broadcasts_over_clips():
    clip = torch.randint(0, 256, (2, 3, 4, 8, 8), dtype=torch.uint8)
    out = normalize(clip, torch.device("cpu"))
    ref = torch.stack([normalize(clip[:, :, t], torch.device("cpu")) for t in range(4)], dim=2)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("spec, text", [("{000..001}.tar", "WebDataset"), ("nonexistent/clips", "nonexistent/clips")])
def test_bad_video_data_fails_before_any_model(monkeypatch, capsys, tmp_path, spec, text):
    for i in range(2):
        (tmp_path / f"00{i}.tar").write_bytes(b"")
    built = []
    monkeypatch.setattr(models, "create_model", lambda *a, **k: built.append(a))
    code = kfe_main(["train", "maskfeat", *TINY, "--out", str(tmp_path / "run"), "--num_frames", "4",
                     "--data", str(tmp_path / spec)])
    assert code == 2 and text in capsys.readouterr().err and built == []


def test_empty_frame_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no clips"):
        FrameFolder(str(tmp_path))
    assert resolve_config("maskfeat", preset="shapes_video")[0].num_frames == 4


def test_bench_uses_the_recipes_own_models():
    from types import SimpleNamespace

    from train.bench import _settings
    from train.recipes.supervised import BENCH

    cpu = torch.device("cpu")
    assert _settings(SimpleNamespace(sizes=""), cpu, "maskfeat") == [("maskfeat_vit_small", 64, 32, 2)]
    assert _settings(SimpleNamespace(sizes="32x8"), cpu, "maskfeat") == [("maskfeat_vit_small", 32, 8, 2)]
    assert _settings(SimpleNamespace(sizes=""), cpu, "supervised") == BENCH["cpu"]


@pytest.mark.gpu
@pytest.mark.parametrize("frames", [1, 16])
def test_gpu_vit_b_bf16_compiled_training(tmp_path, frames):
    """Real ViT-B at 224 px (and 16-frame clips): bf16 autocast, compiled forward, HOG targets on the GPU."""
    def over(device, steps):
        return ["--data", "shapes", "--device", device, "--model", "maskfeat_vit_base", "--model_kwargs", "{}",
                "--resolution", "224", "--batch_size", "64" if frames == 1 else "8", "--num_frames", str(frames),
                "--shapes.size", "64", "--shapes.val_size", "128", "--steps", str(steps), "--warmup_steps", "3",
                "--lr", "1e-3", "--log_every", "1", "--progress", "false", "--num_workers", "4",
                "--out", str(tmp_path / device), "--compile", str(device == "cuda").lower(), "--probe_samples", "128"]

    cfg, preset = resolve_config("maskfeat", overrides=over("cuda", 20))
    summary = train("maskfeat", cfg, preset)
    recs = metrics(cfg.out)
    losses = [r["loss"] for r in recs]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    assert recs[-1]["tflops"] > 0 and summary["eval"]["val_loss"] < 0.2
    if frames == 1:  # the first step (same batch, masks from the seeded CPU generator, same initial ViT-B)
        cpu_cfg, cpu_preset = resolve_config("maskfeat", overrides=over("cpu", 1))  # against one fp32 CPU step
        train("maskfeat", cpu_cfg, cpu_preset)
        first = metrics(cpu_cfg.out)[0]["loss"]
        assert abs(losses[0] - first) <= 1e-2 * first, (losses[0], first)


def test_paper_defaults():
    """MaskFeat's IN-1K ViT-B pre-training (paper appendix; facebookresearch/SlowFast configs/masked_ssl/
    in1k_VIT_B_MaskFeat_PT.yaml: BASE_LR 2e-4 per 256, WEIGHT_DECAY 0.05 with ZERO_WD_1D_PARAM, AdamW
    betas (MOMENTUM 0.9, 0.999), WARMUP_EPOCHS 30, COSINE_END_LR 1e-6, CLIP_GRAD_L2NORM 0.02, MASK_RATIO
    0.4, TRAIN_JITTER_SCALES_RELATIVE [0.5, 1], DROPPATH_RATE 0; 1600 epochs for the paper's ViT-B)."""
    from train.run import resolve_config

    cfg, preset = resolve_config("maskfeat", overrides=["--data", "/data/imagenet"])
    assert preset == "paper" and cfg.model == "maskfeat_vit_base" and cfg.num_frames == 1
    assert (cfg.blr, cfg.batch_size, cfg.weight_decay, tuple(cfg.betas)) == (2e-4, 2048, 0.05, (0.9, 0.999))
    assert cfg.blr * cfg.batch_size / 256 == pytest.approx(1.6e-3)
    assert (cfg.warmup_epochs, cfg.epochs, cfg.min_lr, cfg.clip_grad) == (30.0, 1600.0, 1e-6, 0.02)
    assert (cfg.mask_ratio, cfg.crop_min_scale, cfg.drop_path, cfg.resolution) == (0.4, 0.5, 0.0, 224)


def test_probe_samples_0_trains_and_evaluates_without_probes(tmp_path):
    cfg, summary = _train(tmp_path / "run", "--steps", "2", "--probe_samples", "0")
    assert set(summary["eval"]) == {"val_loss", "val_loss_floor"}
