"""Fine-tuning from pre-trained weights: official-layout checkpoints (random weights, built here from the
official key layouts) initialise a classifier with exactly the expected dropped / new keys, positions are
resized on a resolution change, mismatches fail naming the keys; KFE runs and exports initialise too."""
import math

import pytest
import torch
import torch.nn.functional as F

import models
from models import fcmae_official
from models.maskfeat import to_slowfast
from train.cli import main as kfe_main
from train.init_weights import load_init
from train.run import resolve_config

VIT = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)
DEPTHS, DIMS, DEC = (1, 1, 2, 1), (8, 16, 32, 64), 16


def official_mae(depth=2, dim=32, patch=4, grid=8, dec=16, dec_depth=1) -> dict:
    """facebookresearch/mae models_mae.py MaskedAutoencoderViT.state_dict() layout, random values."""
    def block(prefix, d):
        return {f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,), f"{prefix}.attn.qkv.weight": (3 * d, d),
                f"{prefix}.attn.qkv.bias": (3 * d,), f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
                f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,), f"{prefix}.mlp.fc1.weight": (4 * d, d),
                f"{prefix}.mlp.fc1.bias": (4 * d,), f"{prefix}.mlp.fc2.weight": (d, 4 * d), f"{prefix}.mlp.fc2.bias": (d,)}
    L = grid * grid
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, L + 1, dim), "patch_embed.proj.weight": (dim, 3, patch, patch),
              "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        shapes.update(block(f"blocks.{i}", dim))
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,), "mask_token": (1, 1, dec),
                   "decoder_embed.weight": (dec, dim), "decoder_embed.bias": (dec,), "decoder_pos_embed": (1, L + 1, dec)})
    for i in range(dec_depth):
        shapes.update(block(f"decoder_blocks.{i}", dec))
    shapes.update({"decoder_norm.weight": (dec,), "decoder_norm.bias": (dec,),
                   "decoder_pred.weight": (patch * patch * 3, dec), "decoder_pred.bias": (patch * patch * 3,)})
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def official_fcmae() -> dict:
    """facebookresearch/ConvNeXt-V2 models/fcmae.py state_dict() layout (MinkowskiEngine encoder), random values."""
    c = DIMS
    shapes = {"encoder.downsample_layers.0.0.weight": (c[0], 3, 4, 4), "encoder.downsample_layers.0.0.bias": (c[0],),
              "encoder.downsample_layers.0.1.weight": (c[0],), "encoder.downsample_layers.0.1.bias": (c[0],)}
    for i in range(1, 4):
        p = f"encoder.downsample_layers.{i}"
        shapes.update({f"{p}.0.ln.weight": (c[i - 1],), f"{p}.0.ln.bias": (c[i - 1],),
                       f"{p}.1.kernel": (4, c[i - 1], c[i]), f"{p}.1.bias": (1, c[i])})
    for i, d in enumerate(DEPTHS):
        for j in range(d):
            p, C = f"encoder.stages.{i}.{j}", c[i]
            shapes.update({f"{p}.dwconv.kernel": (49, C), f"{p}.dwconv.bias": (1, C), f"{p}.norm.ln.weight": (C,),
                           f"{p}.norm.ln.bias": (C,), f"{p}.pwconv1.linear.weight": (4 * C, C),
                           f"{p}.pwconv1.linear.bias": (4 * C,), f"{p}.grn.gamma": (1, 4 * C), f"{p}.grn.beta": (1, 4 * C),
                           f"{p}.pwconv2.linear.weight": (C, 4 * C), f"{p}.pwconv2.linear.bias": (C,)})
    D = DEC
    shapes.update({"proj.weight": (D, c[3], 1, 1), "proj.bias": (D,), "mask_token": (1, D, 1, 1),
                   "decoder.0.dwconv.weight": (D, 1, 7, 7), "decoder.0.dwconv.bias": (D,), "decoder.0.norm.weight": (D,),
                   "decoder.0.norm.bias": (D,), "decoder.0.pwconv1.weight": (4 * D, D), "decoder.0.pwconv1.bias": (4 * D,),
                   "decoder.0.grn.gamma": (1, 1, 1, 4 * D), "decoder.0.grn.beta": (1, 1, 1, 4 * D),
                   "decoder.0.pwconv2.weight": (D, 4 * D), "decoder.0.pwconv2.bias": (D,),
                   "pred.weight": (32 * 32 * 3, D, 1, 1), "pred.bias": (32 * 32 * 3,)})
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def vit(img=32, **kw):
    return models.create_model("vit_small_patch16", **{**VIT, "img_size": img, "num_classes": 5, "global_pool": True,
                                                       "pos_embed": "learned", **kw})


def test_official_mae_checkpoint_initialises_a_global_pool_vit(tmp_path):
    sd = official_mae()
    path = str(tmp_path / "mae_pretrain.pth")
    torch.save({"model": sd}, path)
    model = vit()
    report = load_init(model, path)
    assert set(report.dropped) == {"norm.weight", "norm.bias", "mask_token", "decoder_pos_embed", *(
        k for k in sd if k.startswith(("decoder_embed.", "decoder_blocks.", "decoder_norm.", "decoder_pred.")))}
    assert set(report.new) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    got = model.state_dict()
    assert len(report.loaded) == 4 + 2 * 12 and all(torch.equal(got[k], sd[k]) for k in report.loaded)
    assert not report.resized


def test_official_fcmae_checkpoint_initialises_convnextv2(tmp_path):
    sd = official_fcmae()
    path = str(tmp_path / "convnextv2_fcmae.pt")
    torch.save({"model": sd}, path)
    model = models.create_model("convnextv2_atto", depths=list(DEPTHS), dims=list(DIMS), num_classes=5)
    report = load_init(model, path)
    assert set(report.dropped) == {"proj.weight", "proj.bias", "mask_token", "pred.weight", "pred.bias",
                                   *(k for k in sd if k.startswith("decoder."))}
    assert set(report.new) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    dense = fcmae_official.from_official(sd)
    got = model.state_dict()
    for k in report.loaded:
        assert torch.equal(got[k], dense["encoder." + k]), k
    assert got["stages.2.1.dwconv.weight"].shape == (32, 1, 7, 7)


def test_slowfast_maskfeat_checkpoint_initialises_a_vit(tmp_path):
    mf = models.create_model("maskfeat_vit_small", **{**VIT, "patch_size": 16}, img_size=32)
    sd = to_slowfast(mf.state_dict())
    assert "pred_head.transforms.0.0.weight" in sd
    path = str(tmp_path / "maskfeat.pyth")
    torch.save({"model_state": sd, "epoch": 300, "cfg": "MVIT:\n  CLS_EMBED_ON: True\n"}, path)
    model = vit(patch_size=16)
    report = load_init(model, path)
    assert set(report.dropped) == {"mask_token", "pred_head.projections.0.weight", "pred_head.projections.0.bias",
                                   "norm.weight", "norm.bias"}
    assert set(report.new) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert torch.equal(model.pos_embed, sd["pos_embed"])


def test_position_table_is_resized_bicubically_on_a_resolution_change(tmp_path):
    sd = official_mae()
    path = str(tmp_path / "mae.pth")
    torch.save({"model": sd}, path)
    model = vit(img=48)  # 12 x 12 patches instead of 8 x 8
    report = load_init(model, path)
    assert report.resized == ["pos_embed (1, 65, 32) -> (1, 145, 32)"]
    old = sd["pos_embed"]
    grid = old[0, 1:].reshape(8, 8, 32).permute(2, 0, 1)[None]
    ref = F.interpolate(grid.double(), size=(12, 12), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    got = model.pos_embed.detach()
    assert torch.equal(got[0, 0], old[0, 0])  # the cls position is kept
    err = (got[0, 1:].double() - ref.reshape(144, 32)).norm() / ref.norm()
    assert err < 1e-6 and (got[0, 1:].reshape(12, 12, 32)[0, 0] - old[0, 1]).abs().max() < 1.0


def test_mismatched_architectures_fail_naming_the_keys(tmp_path):
    path = str(tmp_path / "fcmae.pt")
    torch.save({"model": official_fcmae()}, path)
    with pytest.raises(ValueError, match=r"does not match model VisionTransformer.*unused checkpoint keys \['downsample"):
        load_init(vit(), path)
    path = str(tmp_path / "mae.pth")
    torch.save({"model": official_mae(dim=48)}, path)
    with pytest.raises(ValueError, match="cls_token has shape"):
        load_init(vit(), path)
    torch.save({"model": official_mae(depth=3)}, path)  # a deeper encoder: its last block has no place
    with pytest.raises(ValueError, match=r"unused checkpoint keys \['blocks.2.norm1"):
        load_init(vit(), path)


def test_long_sequence_mae_checkpoint_without_key_bias_initialises_a_vit(tmp_path):
    """facebookresearch/long_seq_mae: MAE's layout pre-trained at twice the resolution (448 px there, a 16 x 16
    grid here), the decoder's extra down-sampling conv, and its --no_k_bias_in_vit attention (q_bias and
    v_bias, no qkv.bias) -> qkv.bias = [q, 0, v] (its convert_model_ckpt_k_bias.py --add_k_bias), positions
    resized to the fine-tuning grid."""
    sd = official_mae(grid=16)
    for i in range(2):
        qkv = sd.pop(f"blocks.{i}.attn.qkv.bias")
        sd[f"blocks.{i}.attn.q_bias"], sd[f"blocks.{i}.attn.v_bias"] = qkv[:32], qkv[64:]
    sd.update({"decoder_downsample.weight": torch.randn(16, 16, 2, 2), "decoder_downsample.bias": torch.randn(16)})
    path = str(tmp_path / "vitb_dec384d12h8b_800ep_img448_crop0.2-1.0_maskds2.pth")
    torch.save({"model": sd}, path)
    model = vit()
    report = load_init(model, path)
    assert report.resized == ["pos_embed (1, 257, 32) -> (1, 65, 32)"]
    assert {"decoder_downsample.weight", "decoder_downsample.bias"} <= set(report.dropped)
    assert not any("q_bias" in k or "v_bias" in k for k in report.dropped)
    got = model.state_dict()
    for i in range(2):
        q, v = sd[f"blocks.{i}.attn.q_bias"], sd[f"blocks.{i}.attn.v_bias"]
        assert torch.equal(got[f"blocks.{i}.attn.qkv.bias"], torch.cat([q, torch.zeros(32), v]))
    assert len(report.loaded) == 4 + 2 * 12


def test_a_sharded_kfe_checkpoint_initialises_too(tmp_path):
    """An FSDP run's ckpt-*.dcp (DCP shards + kfe-meta.pt), given as the file or through its run directory."""
    import torch.distributed.checkpoint as dcp

    from train import checkpoint as ckpt_mod
    from train import dcp as dcp_mod

    sd = official_mae()
    path = str(tmp_path / "ckpt-00000003.dcp")
    dcp.save({"model": sd}, checkpoint_id=path)
    torch.save({"format": ckpt_mod.FORMAT_VERSION, "recipe": "mae", "step": 3, "config": {}},
               f"{path}/{dcp_mod.META}")
    for init in (path, str(tmp_path)):
        model = vit()
        report = load_init(model, init)
        assert report.source.startswith("KFE mae checkpoint") and len(report.loaded) == 4 + 2 * 12
        assert all(torch.equal(model.state_dict()[k], sd[k]) for k in report.loaded)


def test_a_cls_token_vit_keeps_the_pretrained_norm(tmp_path):
    path = str(tmp_path / "mae.pth")
    torch.save({"model": official_mae()}, path)
    report = load_init(vit(global_pool=False), path)
    assert "norm.weight" in report.loaded and set(report.new) == {"head.weight", "head.bias"}


TINY_MAE = ["--data", "shapes", "--resolution", "32", "--model_kwargs",
            '{"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 16, '
            '"decoder_depth": 1, "decoder_num_heads": 2}', "--batch_size", "16", "--num_workers", "0",
            "--progress", "false", "--shapes.val_size", "32", "--eval_batch_size", "32", "--probe_samples", "32",
            "--eval_samples", "32", "--warmup_steps", "0", "--device", "cpu"]
TINY_FT = ["--data", "shapes", "--model_kwargs", '{"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}',
           "--batch_size", "16", "--shapes.val_size", "32", "--eval_batch_size", "32", "--progress", "false",
           "--device", "cpu", "--steps", "2", "--warmup_steps", "0"]


def test_kfe_run_and_export_initialise_finetune_and_linprobe(tmp_path, capsys):
    mae = str(tmp_path / "mae")
    assert kfe_main(["train", "mae", *TINY_MAE, "--steps", "1", "--out", mae]) == 0
    assert kfe_main(["export", mae, str(tmp_path / "mae.safetensors")]) == 0
    capsys.readouterr()
    for init in (mae, str(tmp_path / "mae.safetensors")):
        out = str(tmp_path / f"ft{len(init)}")
        assert kfe_main(["train", "finetune", *TINY_FT, "--init", init, "--out", out]) == 0
        log = capsys.readouterr().out
        assert "init from" in log and "decoder_blocks.* (12)" in log and "mask_token" in log, log
        assert "new fc_norm.* (2), head.* (2)" in log, log
    assert kfe_main(["train", "linprobe", *TINY_FT, "--init", mae, "--out", str(tmp_path / "lp")]) == 0
    assert "new head.* (2)" in capsys.readouterr().out
    import shutil

    shutil.rmtree(mae)  # the fine-tuned run evaluates from its own checkpoint, without the --init file
    assert kfe_main(["eval", str(tmp_path / "lp"), "--device", "cpu", "--num_workers", "0"]) == 0
    assert "held-out top-1" in capsys.readouterr().out


def test_finetune_without_init_is_the_random_init_baseline(tmp_path, capsys):
    assert kfe_main(["train", "finetune", *TINY_FT, "--out", str(tmp_path / "scratch")]) == 0
    assert "init from" not in capsys.readouterr().out


def test_bad_init_path_is_one_clear_line(tmp_path, capsys):
    assert kfe_main(["train", "finetune", *TINY_FT, "--init", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--init" in err and "no such file" in err


# ------------------------------------------------------------------ presets pinned to their sources

def _preset(name, recipe="finetune"):
    cfg, _ = resolve_config(recipe, preset=name, overrides=["--data", "/data/imagenet"])
    return cfg


def test_mae_presets_follow_finetune_md():
    b = _preset("paper")  # MAE ViT-B: FINETUNE.md, main_finetune.py defaults
    assert (b.model, b.batch_size, b.blr, b.layer_decay, b.weight_decay, b.drop_path, b.epochs, b.warmup_epochs) == (
        "vit_base_patch16", 1024, 5e-4, 0.65, 0.05, 0.1, 100.0, 5.0)
    assert (b.mixup, b.cutmix, b.label_smoothing, b.reprob, b.randaug, b.global_pool, b.min_lr) == (
        0.8, 1.0, 0.1, 0.25, "rand-m9-mstd0.5-inc1", True, 1e-6)
    assert tuple(b.betas) == (0.9, 0.999) and not b.ema
    L, H = _preset("mae_vit_large"), _preset("mae_vit_huge")
    assert (L.model, L.blr, L.layer_decay, L.drop_path, L.epochs) == ("vit_large_patch16", 1e-3, 0.75, 0.2, 50.0)
    assert (H.model, H.blr, H.layer_decay, H.drop_path, H.epochs) == ("vit_huge_patch14", 1e-3, 0.75, 0.3, 50.0)


def test_maskfeat_presets_follow_slowfast_configs():
    """configs/masked_ssl/in1k_VIT_{B,L}_MaskFeat_FT.yaml (BASE_LR at TRAIN.BATCH_SIZE, NUM_SHARDS 1)."""
    m = _preset("maskfeat_vit_base")
    assert (m.model, m.batch_size, m.lr, m.layer_decay, m.epochs, m.warmup_epochs, m.drop_path, m.weight_decay) == (
        "vit_base_patch16", 512, 2e-3, 0.65, 100.0, 20.0, 0.1, 0.05)
    L = _preset("maskfeat_vit_large")
    assert (L.model, L.batch_size, L.lr, L.layer_decay, L.epochs, L.warmup_epochs, L.drop_path, L.weight_decay) == (
        "vit_large_patch16", 256, 1e-3, 0.75, 50.0, 5.0, 0.1, 0.05)
    for c in (m, L):
        assert (c.global_pool, c.head_init_scale, c.mixup, c.cutmix, c.label_smoothing, c.reprob, c.min_lr) == (
            True, 1e-3, 0.8, 1.0, 0.1, 0.25, 1e-6)
        assert c.randaug == "rand-m9-mstd0.5-inc1" and c.decay_pos_cls and not c.ema


@pytest.mark.parametrize("decay_pos_cls", [False, True])
def test_pos_embed_and_cls_token_weight_decay_follow_the_preset(tmp_path, decay_pos_cls):
    """MAE exempts pos_embed / cls_token from weight decay; SlowFast's MaskFeat fine-tuning decays them
    (ZERO_DECAY_POS_CLS: False), still exempting 1-D parameters and biases."""
    from train.dist import init
    from train.recipes import get

    over = TINY_FT[:-4] + ["--out", str(tmp_path), "--decay_pos_cls", str(decay_pos_cls).lower()]
    cfg, _ = resolve_config("finetune", overrides=over)
    rec, info = get("finetune"), init("cpu")
    task = rec.build_task(cfg, rec.build_data(cfg, info), info)
    names = {id(p): n for n, p in task.model.named_parameters()}
    wd = {names[id(p)]: g["weight_decay"] for g in task.param_groups(task.model) for p in g["params"]}
    assert wd["pos_embed"] == wd["cls_token"] == (cfg.weight_decay if decay_pos_cls else 0.0)
    assert wd["blocks.0.attn.qkv.weight"] == cfg.weight_decay and wd["blocks.0.attn.qkv.bias"] == 0.0


# ConvNeXt V2, arXiv 2301.00808 Appendix A.2 Tables 9 (A/F/P/N), 10 (T), 11 (B/L/H), transcribed here by hand
# (TRAINING.md's A / T / B commands agree, except B's base lr: 6.25e-4 there, 6.25e-3 in Table 11, which
# the presets resolve to the command's value for B and L). Columns: blr, epochs, warmup, layer decay type,
# layer decay, weight decay, drop path, mixup = cutmix, label smoothing.
CONVNEXTV2 = {
    "atto": (2e-4, 600.0, 0.0, "single", 0.9, 0.3, 0.1, 0.0, 0.2),
    "femto": (2e-4, 600.0, 0.0, "single", 0.9, 0.05, 0.0, 0.3, 0.2),
    "pico": (2e-4, 600.0, 0.0, "single", 0.9, 0.3, 0.0, 0.3, 0.2),
    "nano": (2e-4, 600.0, 0.0, "single", 0.9, 0.3, 0.1, 0.5, 0.2),
    "tiny": (8e-4, 300.0, 40.0, "single", 0.9, 0.05, 0.2, (0.8, 1.0), 0.1),
    "base": (6.25e-4, 100.0, 20.0, "group", 0.6, 0.05, 0.1, (0.8, 1.0), 0.1),
    "large": (6.25e-4, 100.0, 20.0, "group", 0.6, 0.05, 0.2, (0.8, 1.0), 0.1),
    "huge": (1.25e-3, 50.0, 10.0, "single", 0.75, 0.05, 0.3, (0.8, 1.0), 0.1),
}


@pytest.mark.parametrize("size", list(CONVNEXTV2))
def test_convnextv2_presets_follow_the_paper_tables(size):
    c = _preset(f"convnextv2_{size}")
    blr, epochs, warmup, kind, decay, wd, dp, mix, ls = CONVNEXTV2[size]
    mixup, cutmix = mix if isinstance(mix, tuple) else (mix, mix)
    assert c.model == f"convnextv2_{size}"
    assert (c.blr, c.epochs, c.warmup_epochs, c.layer_decay_type, c.layer_decay, c.weight_decay, c.drop_path) == (
        blr, epochs, warmup, kind, decay, wd, dp)
    assert (c.mixup, c.cutmix, c.label_smoothing) == (mixup, cutmix, ls)
    # every table: batch 1024, AdamW (0.9, 0.999), RandAug (9, 0.5), head init 0.001, EMA 0.9999;
    # main_finetune.py defaults: random erasing 0.25, min lr 1e-6
    assert (c.batch_size, tuple(c.betas), c.randaug, c.head_init_scale, c.ema, c.ema_decay) == (
        1024, (0.9, 0.999), "rand-m9-mstd0.5-inc1", 1e-3, True, 0.9999)
    assert (c.reprob, c.min_lr, c.lr) == (0.25, 1e-6, 0.0)  # lr 0: the blr rule sets it


def test_convnextv2_huge_is_layer_wise_although_auto_would_group_it():
    """A.2: group-wise decay for Base and Large only; Huge (also 36 blocks) is decayed per block."""
    from train.lr_decay import layer_assigner

    with torch.device("meta"):
        huge = models.create_model("convnextv2_huge")
    assert layer_assigner(huge, "auto")[2] == "convnext-group"
    assert layer_assigner(huge, _preset("convnextv2_huge").layer_decay_type)[1:] == (37, "convnext-single")


def test_linprobe_follows_mae_protocol():
    p = _preset("paper", "linprobe")
    assert (p.batch_size, p.blr, p.weight_decay, p.epochs, p.warmup_epochs, p.min_lr, p.global_pool) == (
        16384, 0.1, 0.0, 90.0, 10.0, 0.0, False)
    assert (p.mixup, p.cutmix, p.label_smoothing, p.randaug, p.reprob, p.drop_path) == (0.0, 0.0, 0.0, "", 0.0, 0.0)


def _lars_probe_top1(lr: float, steps: int, batch: int) -> float:
    """BatchNorm (no affine) + a trunc-normal(0.01) linear head trained by LARS on 8 well-separated Gaussian
    classes of 96-d features (a frozen encoder's output, as linprobe sees it); train-set top-1."""
    from train.optim import LARS, WarmupCosine
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 96, generator=g) * 3
    y = torch.randint(0, 8, (2048,), generator=g)
    x = centres[y] + torch.randn(2048, 96, generator=g)
    lin = torch.nn.Linear(96, 8)
    torch.nn.init.trunc_normal_(lin.weight, std=0.01, generator=g)
    torch.nn.init.zeros_(lin.bias)
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(96, affine=False, eps=1e-6), lin)
    opt = LARS(lin.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(steps, steps // 10, 0.0))
    for step in range(steps):
        i = torch.randint(0, 2048, (batch,), generator=g)
        opt.zero_grad()
        F.cross_entropy(head(x[i]), y[i]).backward()
        opt.step()
        sched.step()
    head.eval()
    return (head(x).argmax(1) == y).float().mean().item()


def test_linprobe_shapes_lr_trains_the_head_where_linear_scaling_does_not():
    """LARS moves the head's weights by ~lr * 1e-3 of their norm per step: the shapes preset's lr (the paper's
    absolute 6.4) learns separable classes in its 200 steps; blr 0.1 scaled to the preset's batch leaves the
    head at chance (what the first papers run read as 'MAE features below random ones')."""
    p = resolve_config("linprobe", preset="shapes", overrides=["--data", "shapes"])[0]
    assert p.lr == 6.4 and p.steps == 200
    assert _lars_probe_top1(p.lr, p.steps, 64) > 0.9
    assert _lars_probe_top1(0.1 * 64 / 256, p.steps, 64) < 0.5  # the papers arm's batch


def test_linprobe_model_is_frozen_encoder_bn_head_and_lars(tmp_path):
    from train.dist import init
    from train.optim import LARS
    from train.recipes import get

    cfg, _ = resolve_config("linprobe", overrides=TINY_FT[:-4] + ["--out", str(tmp_path)])
    rec = get("linprobe")
    info = init("cpu")
    task = rec.build_task(cfg, rec.build_data(cfg, info), info)
    head = task.model.head
    assert isinstance(head[0], torch.nn.BatchNorm1d) and not head[0].affine and head[0].eps == 1e-6
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert trainable == {"head.1.weight", "head.1.bias"}
    assert math.isclose(head[1].weight.std().item(), 0.01, rel_tol=0.3)
    opt = task.optimizer([{"params": [head[1].weight]}], 0.1, (0.9, 0.999), torch.device("cpu"))
    assert isinstance(opt, LARS)


FCMAE = ["--data", "shapes", "--resolution", "64", "--model_kwargs", '{"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}',
         "--decoder_embed_dim", "32", "--batch_size", "16", "--num_workers", "0", "--progress", "false",
         "--shapes.val_size", "32", "--eval_batch_size", "32", "--probe_samples", "32", "--warmup_steps", "0",
         "--device", "cpu", "--steps", "1"]
MASKFEAT = ["--data", "shapes", "--model_kwargs", '{"embed_dim": 32, "depth": 1, "num_heads": 2}', "--resolution", "32",
            "--batch_size", "16", "--num_workers", "0", "--progress", "false", "--shapes.val_size", "32",
            "--eval_batch_size", "32", "--warmup_steps", "0", "--probe_samples", "32", "--device", "cpu", "--steps", "1"]


@pytest.mark.parametrize("recipe, pre, ft, new", [
    ("fcmae", FCMAE, ["--model", "convnextv2_atto", "--model_kwargs", '{"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}',
                      "--resolution", "64"], "new head.* (2), norm.* (2)"),
    ("maskfeat", MASKFEAT, ["--model", "vit_small_patch16", "--model_kwargs", '{"embed_dim": 32, "depth": 1, "num_heads": 2}',
                            "--resolution", "32"], "new fc_norm.* (2), head.* (2)"),
])
def test_fcmae_and_maskfeat_runs_initialise_their_classifiers(tmp_path, capsys, recipe, pre, ft, new):
    run = str(tmp_path / recipe)
    assert kfe_main(["train", recipe, *pre, "--out", run]) == 0
    capsys.readouterr()
    args = ["--data", "shapes", "--batch_size", "16", "--shapes.val_size", "32", "--eval_batch_size", "32",
            "--progress", "false", "--device", "cpu", "--steps", "1", "--warmup_steps", "0", "--num_workers", "0"]
    assert kfe_main(["train", "finetune", *args, *ft, "--init", run, "--out", str(tmp_path / "ft")]) == 0
    log = capsys.readouterr().out
    assert f"init from KFE {recipe} checkpoint" in log and new in log and "mask_token" in log, log


def test_convnextv2_initialised_from_fcmae_computes_the_encoders_features(tmp_path):
    # The weights an FCMAE run hands to fine-tuning arrive intact: the dense classifier's pooled features (its
    # fresh final norm is the identity affine) equal the FCMAE encoder's own on unmasked images.
    import models
    from train import checkpoint as ckpt_mod
    from train.init_weights import load_init
    from train.run import _checkpoint_path

    run = str(tmp_path / "fcmae")
    assert kfe_main(["train", "fcmae", *FCMAE, "--out", run, "--lr", "1e-2"]) == 0
    kw = dict(depths=[1, 1, 1, 1], dims=[8, 16, 32, 64])
    pre = models.create_model("fcmae_convnextv2_atto", **kw, decoder_embed_dim=32)
    pre.load_state_dict(ckpt_mod.clean_state_dict(ckpt_mod.load(_checkpoint_path(run))["model"]))
    clf = models.create_model("convnextv2_atto", **kw, num_classes=8)
    load_init(clf, run)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = pre.eval().forward_features(x), clf.eval().forward_features(x)
    assert ((got - want).norm() / want.norm()) < 1e-6
