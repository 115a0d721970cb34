"""Pre-train -> fine-tune papers (issue 20 items 5-7, issue 14's "beats scratch"): MAE, ConvNeXt V2 (FCMAE with
and without GRN), MaskFeat (HOG vs pixel targets). Every pre-trained arm is `kfe train finetune --init <its
pre-training run>` (a Stage, trained once per seed); its baseline is the same fine-tune from random init at
equal fine-tune steps. Metric: the fine-tune's held-out top-1.

Label: `color` (8 classes). At these CPU budgets `shape` is not learnable from scratch (the shapes preset's
ViT stays at 13-21% after 200 steps; benchmarks/results/finetune-shapes.md), so no effect of pre-training
could be read from it; colour is learnt within tens of steps, so the fine-tunes are short (30 and 60
steps) and the question is how much faster pre-trained weights get there.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from train.papers import Arm, Paper, Stage, register

LABEL = ("--shapes.label", "color", "--shapes.val_size", "500")


def _kw(**kw) -> str:
    return json.dumps(kw)


# ---------------------------------------------------------------- MAE (He et al., arXiv 2111.06377)
# A 4-block, 96-wide ViT at 32 px with 8 px patches (16 tokens): the mae shapes preset's model with a
# coarser patch, 4x cheaper per step. Fine-tune: the finetune shapes preset (layer decay 0.75, global pool).
_VIT = dict(patch_size=8, embed_dim=96, depth=4, num_heads=3)
_MAE_MODEL = ("--model_kwargs", _kw(**_VIT, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2))
_MAE_FT = ("--model_kwargs", _kw(**_VIT), "--resolution", "32")
MAE_STAGE = Stage("mae", "mae", (*_MAE_MODEL, "--resolution", "32", "--num_workers", "0", "--probe_samples", "1000",
                                  "--eval_samples", "500"), steps=1000)


def _ft_arms(stage: Stage, ft: tuple[str, ...], budgets: tuple[int, ...], prefix: str = "",
             scratch: str = "scratch") -> tuple[Arm, ...]:
    """For each fine-tune budget: the scratch arm, then the arm from `stage`, compared with that scratch arm."""
    arms = []
    for n in budgets:
        every = ("--steps", str(n), "--eval_every", str(max(n // 5, 5)), "--warmup_steps", str(max(n // 10, 2)))
        base = f"{scratch}-{n}"
        if not any(a.name == base for a in arms):
            arms.append(Arm(base, "finetune", (*ft, *every)))
        arms.append(Arm(f"{prefix or stage.name}-{n}", "finetune", (*ft, *every), pretrain=stage, baseline=base))
    return tuple(arms)


# LARS at the paper's absolute lr 6.4: the linear scaling rule at batch 64 (lr 0.025) leaves the head at its
# initialisation (train/recipes/linprobe.py; the first runs of this paper read 10.9% vs 16.1%, both at chance).
_LINPROBE = (*_MAE_FT, "--batch_size", "64", "--lr", "6.4", "--steps", "200", "--eval_every", "40", "--warmup_steps", "20")
register(Paper(
    name="mae", title="MAE: pre-train then fine-tune vs fine-tune from scratch (equal fine-tune steps)",
    claim="MAE-initialised fine-tuning > random-init fine-tuning; MAE features > random features under a "
          "linear probe",
    arms=(*_ft_arms(MAE_STAGE, _MAE_FT, (30,)),
          Arm("scratch-linprobe", "linprobe", _LINPROBE),
          Arm("mae-linprobe", "linprobe", _LINPROBE, pretrain=MAE_STAGE, baseline="scratch-linprobe"),
          *_ft_arms(MAE_STAGE, _MAE_FT, (60,))),
    metric="top1", steps=60, eval_every=12, common=LABEL,
    notes="label colour (8 classes, 500 held-out images); MAE: 1000 steps, batch 64, mask 0.75, 16 tokens; "
          "fine-tunes of 30 and 60 steps (batch 64, layer decay 0.75); linear probe: frozen encoder, "
          "BatchNorm + linear head, LARS at lr 6.4 (the paper's absolute lr), 200 steps"))


# ---------------------------------------------------------------- ConvNeXt V2 (Woo et al., arXiv 2301.00808)
# Sec. 3.2 / Table 2: FCMAE on ConvNeXt without GRN fine-tunes worse than with GRN (GRN fixes the feature
# collapse FCMAE otherwise causes). The fcmae shapes preset's 4-stage, 1-block-per-stage ConvNeXt V2
# (here at 64 px: 2x2 patches of 32 px, 2 masked, to keep drawing the images cheap); `grn: false` removes GRN
# from every encoder block and from the fine-tuned model (the decoder block keeps it, as the paper's ablation
# changes the encoder). The analysis also measures the collapse itself (feature_diversity).
_CNX = dict(depths=[1, 1, 1, 1], dims=[16, 32, 64, 128])
_CNX_FT = ("--model", "convnextv2_atto", "--resolution", "64", "--layer_decay", "0.9", "--layer_decay_type", "single")
_FC = ("--resolution", "64", "--num_workers", "0", "--init_baseline", "false", "--probe_samples", "1000")
FCMAE_GRN = Stage("fcmae", "fcmae", ("--model_kwargs", _kw(**_CNX), *_FC), steps=150)
FCMAE_NOGRN = Stage("fcmae-nogrn", "fcmae", ("--model_kwargs", _kw(**_CNX, grn=False), *_FC), steps=150)


def _cnx_arms(budget: int) -> tuple[Arm, ...]:
    """Scratch, FCMAE with GRN (vs scratch), FCMAE without GRN (vs FCMAE with GRN: the paper's comparison)."""
    every = ("--steps", str(budget), "--eval_every", str(budget // 4), "--warmup_steps", str(budget // 10))
    grn = (*_CNX_FT, "--model_kwargs", _kw(**_CNX), *every)
    nogrn = (*_CNX_FT, "--model_kwargs", _kw(**_CNX, grn=False), *every)
    return (Arm(f"scratch-{budget}", "finetune", grn),
            Arm(f"fcmae-{budget}", "finetune", grn, pretrain=FCMAE_GRN, baseline=f"scratch-{budget}"),
            Arm(f"fcmae-nogrn-{budget}", "finetune", nogrn, pretrain=FCMAE_NOGRN, baseline=f"fcmae-{budget}"))


def channel_cosine_distance(act: torch.Tensor) -> float:
    """ConvNeXt V2's feature cosine distance (Sec. 3.1): for activations (N, H, W, C), the mean over images of
    (1 - cos(X_i, X_j)) / 2 over every channel pair, X_i channel i's H*W map. Low = collapsed (channels alike)."""
    n, h, w, c = act.shape
    maps = torch.nn.functional.normalize(act.reshape(n, h * w, c).double(), dim=1)
    return float(((1 - maps.transpose(1, 2) @ maps) / 2).mean())


def feature_diversity(runs: list[dict], images: int = 64) -> tuple[dict, list[str]]:
    """Per block, the cosine distance of the expansion-MLP activations (after GELU, before GRN: where the paper
    looks) of each FCMAE encoder (with / without GRN) and of a random one, on held-out images."""
    import models
    from train.data.shapes import Shapes
    from train.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from train.init_weights import load_init
    from train.papers.report import _stats

    stages = {}
    for r in runs:
        if "pretrain" in r:
            stages.setdefault(r["pretrain"]["stage"], {})[r["seed"]] = r["pretrain"]["run_dir"]
    if not stages:
        return {}, []
    ds = Shapes("val", images, 64, "color", 0)
    x = torch.from_numpy(np.stack([ds[i]["image"] for i in range(images)])).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    seeds = sorted({s for runs_of in stages.values() for s in runs_of})

    def distances(name: str, seed: int) -> list[float]:
        torch.manual_seed(seed)
        model = models.create_model("convnextv2_atto", **_CNX, num_classes=8, grn=name != "fcmae-nogrn")
        if name != "random":
            load_init(model, stages[name][seed])
        acts = []
        for stage in model.stages:
            for block in stage:
                block.act.register_forward_hook(lambda mod, inp, out: acts.append(out))
        with torch.no_grad():
            model.eval()(x)
        return [channel_cosine_distance(a) for a in acts]

    data, lines = {}, ["", f"Feature cosine distance (the paper's Sec. 3.1 collapse measure; expansion-MLP "
                           f"activations, {images} held-out images; mean ± std over seeds {seeds}):", "",
                       "| encoder | " + " | ".join(f"block {i + 1}" for i in range(len(_CNX["depths"]))) + " |",
                       "|---" * (len(_CNX["depths"]) + 1) + "|"]
    for name in (*stages, "random"):
        per_seed = [distances(name, s) for s in seeds if name == "random" or s in stages[name]]
        blocks = [_stats([d[i] for d in per_seed]) for i in range(len(per_seed[0]))]
        data[name] = blocks
        lines.append(f"| {name} | " + " | ".join(f"{m:.3f} ± {sd:.3f}" for m, sd in blocks) + " |")
    return {"feature_cosine_distance": data}, lines


register(Paper(
    name="convnextv2", title="ConvNeXt V2: FCMAE with GRN vs without GRN, fine-tuned (vs scratch)",
    claim="FCMAE pre-training helps fine-tuning with GRN, less (or not) without it",
    arms=(*_cnx_arms(40), *_cnx_arms(80)), metric="top1", steps=40, eval_every=10, common=LABEL,
    notes="label colour, 500 held-out images; ConvNeXt V2 depths 1-1-1-1, dims 16-128, 64 px; FCMAE 150 steps, "
          "batch 64, mask 0.6 (2 of 4 patches); fine-tunes of 40 and 80 steps, batch 64, layer decay 0.9 (single)",
    analyze=feature_diversity))


# ---------------------------------------------------------------- MaskFeat (Wei et al., arXiv 2112.09133)
# Table 1 / Sec. 4.1: HOG targets fine-tune better than pixel colours. The maskfeat shapes preset's ViT
# (4 blocks, 128 wide), here at 32 px with 8 px patches and 4 px HOG cells (16 tokens, 108 HOG values each,
# 40% block-masked; drawing 32 px images is 4x cheaper than the preset's 64 px); `target: pixel` regresses
# the masked patches' input pixels instead of their HOG.
_MF = dict(patch_size=8, embed_dim=128, depth=4, num_heads=4)
_MF_FT = ("--model", "vit_small_patch16", "--model_kwargs", _kw(**_MF), "--resolution", "32")
_MF_PT = ("--resolution", "32", "--num_workers", "0", "--probe_samples", "1000")
MF_HOG = Stage("maskfeat-hog", "maskfeat", ("--model_kwargs", _kw(**_MF, cell=4), *_MF_PT), steps=150)
MF_PIXEL = Stage("maskfeat-pixel", "maskfeat", ("--model_kwargs", _kw(**_MF, cell=4, target="pixel"), *_MF_PT),
                 steps=150)
_MF_EVERY = ("--steps", "40", "--eval_every", "10", "--warmup_steps", "4")
register(Paper(
    name="maskfeat", title="MaskFeat: HOG targets vs pixel targets, fine-tuned (vs scratch)",
    claim="HOG-target pre-training fine-tunes better than pixel-target pre-training",
    arms=(Arm("scratch-40", "finetune", (*_MF_FT, *_MF_EVERY)),
          Arm("pixel-40", "finetune", (*_MF_FT, *_MF_EVERY), pretrain=MF_PIXEL),
          Arm("hog-40", "finetune", (*_MF_FT, *_MF_EVERY), pretrain=MF_HOG, baseline="pixel-40")),
    metric="top1", steps=40, eval_every=10, common=LABEL,
    notes="label colour, 500 held-out images; ViT 4 blocks, width 128, 8 px patches at 32 px; MaskFeat 150 "
          "steps, batch 64, mask 0.4; fine-tune 40 steps, batch 64, layer decay 0.75; effects: pixel vs "
          "scratch, hog vs pixel"))
