"""DiT on VAE latents end to end: kfe latents encode -> kfe train dit -> kfe sample dit --vae, on a tiny
randomly initialised diffusers AutoencoderKL saved in the sd-vae-ft-* layout (nothing downloaded)."""
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from tests.train.util import TINY
from train.cli import main as kfe
from train.run import resolve_config, train
from train.sample import GAP, choose_ema


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=8, sample_size=16)  # scaling_factor: SD-VAE's 0.18215 (the default)
    d = str(tmp_path_factory.mktemp("vae") / "sd-vae-ft-tiny")
    vae.save_pretrained(d)
    assert sorted(os.listdir(d)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    return d


@pytest.mark.slow  # ~4 s alone, ~17 s on the loaded 2-core machine (diffusers import, 3 runs)
def test_encode_train_sample_end_to_end(vae_dir, tmp_path, capsys):
    lat = str(tmp_path / "latents")
    assert kfe(["latents", "encode", "--vae", vae_dir, "--data", "shapes", "--out", lat, "--resolution", "16",
                "--batch", "8", "--shard-size", "10", "--limit", "24", "--quiet"]) == 0
    assert sorted(os.listdir(lat)) == ["00000.npz", "00001.npz", "00002.npz"]
    with np.load(os.path.join(lat, "00002.npz")) as z:
        assert z["latents"].shape == (4, 4, 8, 8) and z["labels"].shape == (4,)
        assert float(z["latent_scale"]) == pytest.approx(0.18215)
    assert "latent_scale 0.18215" in capsys.readouterr().out

    out = str(tmp_path / "run")
    cfg, preset = resolve_config("dit", overrides=["--data", lat, "--val_data", lat, *TINY, "--batch_size", "8",
                                                   "--steps", "3", "--model", "dit_s_2", "--model_kwargs",
                                                   '{"hidden_size": 32, "depth": 1, "num_heads": 2}', "--out", out])
    assert cfg.latent_scale == 0  # not given: read from the shards
    summary = train("dit", cfg, preset)
    assert cfg.latent_scale == pytest.approx(0.18215) and summary["step"] == 3
    assert 'latent_scale = 0.18215' in open(os.path.join(out, "config.toml")).read()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kfe(["sample", "dit", "--ckpt", out, "--vae", vae_dir, "--steps", "2", "--classes", "0,1",
                    "--per-class", "2", "--quiet"]) == 0
    assert any("using the raw weights" in str(w.message) for w in caught)  # 3 steps: EMA not caught up
    grid = np.asarray(Image.open(os.path.join(out, "samples.png")))  # in the run directory by default
    assert grid.shape == (2 * (16 + GAP) + GAP, 2 * (16 + GAP) + GAP, 3)  # decoded: 16 px images, not 8x8 latents
    assert np.load(os.path.join(out, "samples.npy")).shape == (4, 4, 8, 8)
    assert "raw weights of step 3" in capsys.readouterr().out


def test_ema_is_used_once_it_has_caught_up():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert choose_ema(True, 0.9999, 100, None) is False       # 99% initialisation: raw, warned
        assert choose_ema(True, 0.9999, 100, True) is True        # forced: EMA, warned
        assert len(caught) == 2 and "still the random initialisation" in str(caught[1].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_ema(True, 0.995, 1200, None) is True        # the shapes preset: 0.2% left
        assert choose_ema(True, 0.9999, 100, False) is False
        assert choose_ema(False, 0.9999, 10 ** 6, None) is False


def test_shards_without_a_recorded_scale_use_sd_vae_with_a_warning_and_disagreeing_ones_fail(tmp_path):
    from train.data.latents import LatentError, LatentShards
    from train.recipes.dit import DiTConfig, resolve_latent_scale

    z = np.zeros((2, 4, 8, 8), np.float32)
    np.savez(tmp_path / "a.npz", latents=z)
    np.savez(tmp_path / "b.npz", latents=z, latent_scale=0.5)
    np.savez(tmp_path / "c.npz", latents=z, latent_scale=0.18215)
    assert LatentShards([str(tmp_path / "a.npz")]).latent_scale is None
    assert LatentShards([str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]).latent_scale == 0.5
    with pytest.raises(LatentError, match="different latent_scale"):
        LatentShards([str(tmp_path / "b.npz"), str(tmp_path / "c.npz")])
    cfg = DiTConfig()
    resolve_latent_scale(cfg, 0.5)  # not given: the recorded one
    assert cfg.latent_scale == 0.5
    cfg = DiTConfig()
    with pytest.warns(UserWarning, match="record no latent_scale"):
        resolve_latent_scale(cfg, None)
    assert cfg.latent_scale == 0.18215
    cfg = DiTConfig(latent_scale=0.5)
    with pytest.warns(UserWarning, match="overrides"):
        resolve_latent_scale(cfg, 0.18215)
    assert cfg.latent_scale == 0.5


def test_ema_warmup_matches_timm_model_ema_v3():
    from timm.utils import ModelEmaV3

    from train.optim import EMA
    from train.sample import init_share

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    ours, timm = EMA(net, 0.999, warmup=True), ModelEmaV3(net, decay=0.999, use_warmup=True)
    for step in range(1, 31):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ours.update(net, step)
        timm.update(net, step)
        for k, v in timm.module.state_dict().items():
            torch.testing.assert_close(ours.module.state_dict()[k], v, rtol=1e-6, atol=1e-7, msg=f"{step} {k}")
    assert init_share(0.999, 30, warmup=True) == 0.0 and init_share(0.999, 30) == pytest.approx(0.999 ** 30)
    assert choose_ema(True, 0.9999, 100, None, warmup=True) is True  # warmed up: the EMA, no warning
