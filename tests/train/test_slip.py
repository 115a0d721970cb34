"""The slip recipe beyond its training run (tests/train/test_clip.py): SLIP's paper defaults, the loss as
CLIP + ssl_scale x SimCLR on the built task, the SimCLR head sizes, SimCLR's view pipeline."""
import numpy as np
import pytest
import torch

from tests.train.clip_util import TINY
from tests.train.util import built_trainer
from train.run import resolve_config


def test_paper_defaults():
    """SLIP's README "SLIP ViT-Base with 8-nodes (batch size 4096)": lr 3e-3, weight decay 0.1; main.py:
    25 epochs, 1 warmup epoch, betas (0.9, 0.98), cosine to 1e-5, --ssl-mlp-dim 4096, --ssl-emb-dim 256,
    --ssl-scale 1.0, --ssl-temp 0.1; SimCLR views cropped at scale (0.08, 1), the CLIP view at (0.5, 1)."""
    cfg, preset = resolve_config("slip", overrides=["--data", "/data/yfcc15m"])
    assert preset == "paper" and cfg.model == "slip_vit_base_patch16" and cfg.batch_size == 4096
    assert cfg.blr * cfg.batch_size / 256 == pytest.approx(3e-3) and cfg.weight_decay == 0.1
    assert (cfg.epochs, cfg.warmup_epochs, cfg.min_lr, tuple(cfg.betas)) == (25.0, 1.0, 1e-5, (0.9, 0.98))
    assert (cfg.ssl_mlp_dim, cfg.ssl_emb_dim, cfg.ssl_scale, cfg.ssl_temp) == (4096, 256, 1.0, 0.1)
    assert (cfg.ssl_crop_min_scale, cfg.crop_min_scale) == (0.08, 0.5)


@pytest.fixture(scope="module")
def slip(tmp_path_factory):
    return built_trainer("slip", tmp_path_factory.mktemp("slip"), "--data", "shapes", *TINY, "--ssl_scale", "0.5",
                         "--ssl_mlp_dim", "24", "--ssl_emb_dim", "12", "--ssl_temp", "0.2")


def test_loss_is_clip_plus_scaled_simclr_on_three_views(slip):
    from train.recipes.slip import simclr_loss

    batch = slip.prepare(next(iter(slip.loader)))
    views = batch["image"]
    assert views.shape[:3] == (16, 3, 3)                                      # (B, C, 3 views, H, W)
    slip.module.eval()            # BN on running statistics: the head's batching (per view or both) is moot
    torch.manual_seed(0)
    loss, extra = slip.task.loss(slip.module, batch, 0)
    assert float(loss) == pytest.approx(float(extra["clip_loss"] + 0.5 * extra["ssl_loss"]), rel=1e-6)
    with torch.no_grad():                                                     # the SimCLR term on views 1 and 2
        z1 = slip.module.image_mlp(slip.module.image_features(views[:, :, 1]))
        z2 = slip.module.image_mlp(slip.module.image_features(views[:, :, 2]))
    assert float(extra["ssl_loss"]) == pytest.approx(float(simclr_loss(z1, z2, 0.2)), rel=1e-5)
    assert not torch.equal(views[:, :, 1], views[:, :, 2])                  # two independent augmentations
    slip.module.train()


def test_simclr_head_sizes_follow_the_config(slip):
    linears = [m for m in slip.module.image_mlp.modules() if isinstance(m, torch.nn.Linear)]
    bns = [m for m in slip.module.image_mlp.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 24), (24, 24), (24, 12)]   # 3 layers
    assert len(bns) == 2                                                      # SLIP's _build_mlp: BN + ReLU x 2


def test_simclr_views_grayscale_about_one_in_five():
    """SimCLR's RandomGrayscale(p=0.2) after the colour jitter (p=0.8): a grey view has equal channels."""
    from train.data.simclr import simclr_transform

    rng = np.random.default_rng(0)
    img = (rng.random((24, 24, 3)) * 255).astype(np.uint8)
    img[..., 0] = 255                                                         # strongly coloured
    view = simclr_transform(24)
    grey = [bool((v[0] == v[1]).all() and (v[1] == v[2]).all())
            for v in (view(img, np.random.default_rng(s)) for s in range(300))]
    assert 0.13 < np.mean(grey) < 0.27, np.mean(grey)
