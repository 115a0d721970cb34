"""The supervised recipe built, not trained: ConvNeXt's ImageNet-1K optimizer and regularisation values
(Appendix A.1, Table 5) through the trainer, and the task loss on Mixup/CutMix soft targets. (RandAugment,
random erasing and the per-size stochastic depth are pinned with their implementation.)"""
import pytest
import torch
import torch.nn.functional as F

from tests.train.util import TINY, built_trainer, group_names
from train.run import resolve_config


def test_paper_defaults_reach_the_optimizer(tmp_path):
    cfg, preset = resolve_config("supervised", overrides=["--data", "/data/imagenet"])
    assert preset == "paper" and cfg.model == "convnext_tiny" and cfg.batch_size == 4096
    assert cfg.blr * cfg.batch_size / 256 == pytest.approx(4e-3) and cfg.weight_decay == 0.05   # Table 5
    assert (cfg.epochs, cfg.warmup_epochs, tuple(cfg.betas)) == (300.0, 20.0, (0.9, 0.999))
    assert (cfg.label_smoothing, cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob) == (0.1, 0.8, 1.0,
                                                                                                   1.0, 0.5)
    assert cfg.ema and cfg.ema_decay == 0.9999 and cfg.crop_min_scale == 0.08 and cfg.resolution == 224
    t = built_trainer("supervised", tmp_path, "--data", "shapes", *TINY, "--batch_size", "32", preset="paper")
    assert t.lr == pytest.approx(2.5e-4 * 32 / 256) and t.ema is not None and t.ema.decay == 0.9999
    (wd, decay), (no_wd, no_decay) = group_names(t)
    assert (wd, no_wd) == (0.05, 0.0) and "stages.0.0.gamma" in no_decay and "head.weight" in decay


def test_loss_is_soft_cross_entropy_on_the_mixed_batch(tmp_path):
    t = built_trainer("supervised", tmp_path, "--data", "shapes", *TINY, "--mixup", "0.8", "--cutmix", "0.0",
                      "--label_smoothing", "0.1")
    batch = t.prepare(next(iter(t.loader)))
    x, y = batch["image"], batch["label"]
    torch.manual_seed(3)
    loss, _ = t.task.loss(t.module, batch, 0)
    torch.manual_seed(3)                                    # the same Beta draw: recover lam from the pixels
    from train.mixup import MixupCutmix

    mixed, target = MixupCutmix(8, 0.8, 0.0, smoothing=0.1)(x, y)
    with torch.no_grad():
        logits = t.module(mixed).float()
    want = -(target * F.log_softmax(logits, -1)).sum(-1).mean()
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    assert not torch.equal(mixed, x)
    t2 = built_trainer("supervised", tmp_path / "b", "--data", "shapes", *TINY, "--mixup", "0", "--cutmix", "0",
                       "--label_smoothing", "0.2")
    loss2, _ = t2.task.loss(t2.module, batch, 0)           # no mixing: plain label-smoothed cross-entropy
    with torch.no_grad():
        want2 = F.cross_entropy(t2.module(x).float(), y, label_smoothing=0.2)
    assert float(loss2) == pytest.approx(float(want2), rel=1e-5)
