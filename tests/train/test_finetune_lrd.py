"""Layer-wise lr decay equals the official assignment (transcribed below from facebookresearch/mae
util/lr_decay.py and facebookresearch/ConvNeXt-V2 optim_factory.py + main_finetune.py) for ViT-B and
ConvNeXt V2-B, group by group: names, parameter lists, lr scales, weight decays; the optimizer applies the
scales at every step; RandAugment / random erasing of the ConvNeXt recipe; LARS as MAE's util/lars.py."""
import random

import numpy as np
import pytest
import torch

import models
from train.lr_decay import param_groups_lrd
from train.optim import LARS, adamw, scheduler
from train.run import resolve_config


# ---------------------------------------------------------------- transcriptions of the official code

def mae_layer_id(name, num_layers):
    if name in ["cls_token", "pos_embed"]:
        return 0
    elif name.startswith("patch_embed"):
        return 0
    elif name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    else:
        return num_layers


def mae_param_groups_lrd(model, weight_decay, no_weight_decay_list, layer_decay):
    names, num_layers = {}, len(model.blocks) + 1
    layer_scales = list(layer_decay ** (num_layers - i) for i in range(num_layers + 1))
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or n in no_weight_decay_list:
            g_decay, this_decay = "no_decay", 0.0
        else:
            g_decay, this_decay = "decay", weight_decay
        layer_id = mae_layer_id(n, num_layers)
        group_name = "layer_%d_%s" % (layer_id, g_decay)
        if group_name not in names:
            names[group_name] = {"lr_scale": layer_scales[layer_id], "weight_decay": this_decay, "params": []}
        names[group_name]["params"].append(n)
    return names


def convnext_group_id(var_name):
    num_max_layer = 12
    if var_name.startswith("downsample_layers"):
        stage_id = int(var_name.split(".")[1])
        if stage_id == 0:
            layer_id = 0
        elif stage_id == 1 or stage_id == 2:
            layer_id = stage_id + 1
        elif stage_id == 3:
            layer_id = 12
        return layer_id
    elif var_name.startswith("stages"):
        stage_id = int(var_name.split(".")[1])
        block_id = int(var_name.split(".")[2])
        if stage_id == 0 or stage_id == 1:
            layer_id = stage_id + 1
        elif stage_id == 2:
            layer_id = 3 + block_id // 3
        elif stage_id == 3:
            layer_id = 12
        return layer_id
    else:
        return num_max_layer + 1


def convnext_single_id(var_name, depths):
    if var_name.startswith("downsample_layers"):
        return sum(depths[:int(var_name.split(".")[1])]) + 1
    elif var_name.startswith("stages"):
        stage_id, block_id = int(var_name.split(".")[1]), int(var_name.split(".")[2])
        return sum(depths[:stage_id]) + block_id + 1
    else:
        return sum(depths) + 1


def convnext_param_groups(model, weight_decay, layer_decay, kind, depths):
    num_layers = 12 if kind == "group" else sum(depths)  # main_finetune.py
    values = list(layer_decay ** (num_layers + 1 - i) for i in range(num_layers + 2))
    names = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if len(param.shape) == 1 or name.endswith(".bias") or name.endswith(".gamma") or name.endswith(".beta"):
            group_name, this_weight_decay = "no_decay", 0.0
        else:
            group_name, this_weight_decay = "decay", weight_decay
        layer_id = convnext_group_id(name) if kind == "group" else convnext_single_id(name, depths)
        group_name = "layer_%d_%s" % (layer_id, group_name)
        if group_name not in names:
            names[group_name] = {"weight_decay": this_weight_decay, "params": [], "lr_scale": values[layer_id]}
        names[group_name]["params"].append(name)
    return names


def _ours(model, groups):
    ids = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {"lr_scale": g["lr_scale"], "weight_decay": g["weight_decay"],
                        "params": [ids[id(p)] for p in g["params"]]} for g in groups}


def _meta(name, **kw):
    with torch.device("meta"):
        return models.create_model(name, **kw)


def test_vit_b_groups_equal_mae_lr_decay():
    model = _meta("vit_base_patch16", num_classes=1000, global_pool=True, pos_embed="learned")
    want = mae_param_groups_lrd(model, 0.05, ["pos_embed", "cls_token", "dist_token"], 0.65)
    got = _ours(model, param_groups_lrd(model, 0.05, 0.65))
    assert got == want and len(got) == 2 * 14
    assert got["layer_13_decay"]["lr_scale"] == 1.0 and got["layer_0_no_decay"]["lr_scale"] == 0.65 ** 13


@pytest.mark.parametrize("name, kind, decay", [("convnextv2_base", "group", 0.6), ("convnextv2_atto", "single", 0.9),
                                               ("convnextv2_tiny", "single", 0.9)])
def test_convnextv2_groups_equal_optim_factory(name, kind, decay):
    model = _meta(name, num_classes=1000)
    depths = [len(s) for s in model.stages]
    want = convnext_param_groups(model, 0.05, decay, kind, depths)
    got = _ours(model, param_groups_lrd(model, 0.05, decay, kind))
    assert got == want
    assert _ours(model, param_groups_lrd(model, 0.05, decay, "auto")) == want  # auto picks the same type


def test_optimizer_applies_the_scales_at_every_step():
    torch.manual_seed(0)
    model = models.create_model("vit_small_patch16", patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=16,
                                num_classes=3)
    groups = param_groups_lrd(model, 0.05, 0.5)
    opt = adamw(groups, 1e-3, (0.9, 0.999), torch.device("cpu"))
    sched = scheduler(opt, 10, 2, 1e-3, 1e-6)
    for _ in range(4):
        opt.step()
        sched.step()
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(opt.param_groups[-1]["lr"] * g["lr_scale"] / opt.param_groups[-1]["lr_scale"])
    scales = {g["name"]: g["lr_scale"] for g in opt.param_groups}
    assert scales["layer_0_no_decay"] == 0.5 ** 3 and scales["layer_3_decay"] == 1.0


# ---------------------------------------------------------------- LARS (MAE util/lars.py, transcribed)

def test_lars_matches_mae_transcription():
    torch.manual_seed(0)
    w, b = torch.randn(4, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    w2, b2 = w.detach().clone(), b.detach().clone()
    opt = LARS([w, b], lr=0.5, weight_decay=0.1)
    mu = {0: torch.zeros_like(w2), 1: torch.zeros_like(b2)}
    for step in range(3):
        gw, gb = torch.randn(4, 3), torch.randn(4)
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        for i, (p, g) in enumerate(((w2, gw), (b2, gb))):
            dp = g
            if p.ndim > 1:
                dp = dp.add(p, alpha=0.1)
                param_norm, update_norm = torch.norm(p), torch.norm(dp)
                one = torch.ones_like(param_norm)
                q = torch.where(param_norm > 0., torch.where(update_norm > 0, (0.001 * param_norm / update_norm), one), one)
                dp = dp.mul(q)
            mu[i].mul_(0.9).add_(dp)
            p.add_(mu[i], alpha=-0.5)
        assert torch.equal(w.detach(), w2) and torch.equal(b.detach(), b2)


# ---------------------------------------------------------------- the supervised ConvNeXt recipe (issue 18)

@pytest.mark.parametrize("model, rate", [("convnext_tiny", 0.1), ("convnext_small", 0.4), ("convnext_base", 0.5),
                                         ("convnext_large", 0.5), ("convnext_xlarge", 0.5)])
def test_supervised_convnext_resolves_paper_drop_path_randaugment_erasing(model, rate):
    cfg, preset = resolve_config("supervised", overrides=["--data", "/data/imagenet", "--model", model])
    assert preset == "paper" and cfg.drop_path == rate
    assert cfg.randaug == "rand-m9-mstd0.5-inc1" and cfg.reprob == 0.25


def test_supervised_shapes_keeps_its_own_augmentation_and_explicit_drop_path_wins():
    cfg, preset = resolve_config("supervised", overrides=["--data", "shapes"])
    assert preset == "shapes" and cfg.randaug == "" and cfg.reprob == 0.0 and cfg.drop_path == 0.0
    cfg, _ = resolve_config("supervised", overrides=["--data", "/d", "--model", "convnext_small", "--drop_path", "0.2"])
    assert cfg.drop_path == 0.2


def test_randaugment_is_timms_seeded_per_sample_and_leaves_global_random_alone():
    from PIL import Image

    from train.data.transforms import make_transform

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    t = make_transform(32, "rrc", randaug="rand-m9-mstd0.5-inc1")
    plain = make_transform(32, "rrc")
    random.seed(123)
    before = random.getstate()
    a = t(img, np.random.default_rng(5))
    assert random.getstate() == before
    ref = [t(img, np.random.default_rng(k)) for k in range(8)]
    for seed in (1, 2, 3):  # whatever state the worker's global generators are in (timm uses np.random.choice)
        random.seed(seed)
        np.random.seed(seed)
        assert all(torch.equal(r, t(img, np.random.default_rng(k))) for k, r in enumerate(ref))
    outs = [t(img, np.random.default_rng(s)) for s in range(6)]
    plains = [plain(img, np.random.default_rng(s)) for s in range(6)]
    assert sum(not torch.equal(o, p) for o, p in zip(outs, plains)) >= 4  # the ops change pixels
    for seed in range(200):  # many ops and magnitudes: none raises
        t(img, np.random.default_rng(seed))
    with pytest.raises(ValueError, match="randaug"):
        make_transform(32, "rrc", randaug="bogus-m9")


def test_random_erasing_is_timms_and_erases_about_a_quarter():
    from train.recipes.supervised import random_erasing

    erase = random_erasing(0.25)
    x = torch.zeros(400, 3, 16, 16)
    random.seed(0)
    out = erase(x)
    erased = (out != 0).flatten(1).any(1).float().mean().item()
    assert 0.17 < erased < 0.33 and torch.equal(x, torch.zeros_like(x))  # the input is not modified
    assert random_erasing(0.0) is None


def test_posterize_at_magnitude_10_keeps_zero_bits_as_timm_meant():
    """inc1 posterize at magnitude 10 keeps 0 bits; Pillow >= 11 raises there (the SIGKILL resume test with
    RandAugment on hit it), older Pillow made the image black: ours does that."""
    from PIL import Image, ImageOps
    from timm.data import auto_augment

    from train.data.transforms import _posterize

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    assert auto_augment._posterize_increasing_level_to_arg(10, {}) == (0,)
    with pytest.raises(ValueError):
        auto_augment.posterize(img, 0)
    assert not np.asarray(_posterize(img, 0)).any()
    from train.data.transforms import rand_augment

    posterizes = [o for o in rand_augment("rand-m9-mstd0.5-inc1", 32).op.ops if o.name.startswith("Posterize")]
    assert posterizes
    for o in posterizes:  # the RandAugment in use runs it at magnitude 10 without raising
        o.prob, o.magnitude, o.magnitude_std = 1.0, 10, 0
        assert not np.asarray(o(img)).any()
    for bits in range(1, 8):
        assert np.array_equal(np.asarray(_posterize(img, bits)), np.asarray(ImageOps.posterize(img, bits)))
