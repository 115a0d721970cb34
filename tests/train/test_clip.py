"""clip / slip on shapes: the loss falls, zero-shot evaluation (a hand-checkable case, in training, in
`kfe eval`, on an ImageFolder), the tokenizer in the run directory and checkpoint, --captions bow,
pseudo-BoW captions from a trained run, SLIP's views."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.train.clip_util import falls, run
from tests.train.util import metrics
from train import checkpoint as ckpt_mod
from train.cli import main as kfe_main
from train.config import ConfigError
from train.curation.bow import STOP_WORDS, bag_of_words
from train.data import DataError
from train.data import tokenizer as tok_mod
from train.data.shapes import SHAPES, Shapes
from train.dist import DistInfo
from train.eval import prompts, zero_shot_top1, zero_shot_weights
from train.pseudo_bow import assign
from train.recipes.image_text import Captioner
from train.run import evaluate_checkpoint, resolve_config


def test_zero_shot_hand_checkable():
    # "cat" -> e0, "dog" -> e1; the two templates add +-0.5 e2 and scale by 1 / 3: normalising each prompt
    # first, the per-class average cancels e2 exactly.
    def encode_text(texts):
        return torch.tensor([[1.0 if t.endswith("cat") else 0.0, 1.0 if t.endswith("dog") else 0.0,
                              0.5 if t.startswith("a ") else -0.5] for t in texts]) * torch.tensor(
            [[1.0] if t.startswith("a ") else [3.0] for t in texts])
    table = prompts(["cat", "dog"], ["a {}", "one {}"])
    assert table == [["a cat", "one cat"], ["a dog", "one dog"]]
    weights = zero_shot_weights(encode_text, table)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    images = torch.tensor([[2.0, 0.1, 5.0], [1.0, 0.2, 0.0], [0.3, 1.0, 0.0], [1.0, 0.9, -3.0]])
    batch = {"image": images, "label": torch.tensor([0, 0, 1, 1])}  # predictions 0, 0, 1, 0
    out = zero_shot_top1(lambda x: x, weights, [batch], lambda b: b, DistInfo())
    assert out == {"top1": 0.75, "chance": 0.5, "n": 4, "class_top1": [1.0, 0.5]}
    with pytest.raises(ValueError, match="'{}'"):
        prompts(["cat"], ["a photo"])


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    # 16 images seen again every step (shapes.size = batch): the loss must fall fast.
    out = tmp_path_factory.mktemp("clip") / "run"
    cfg, summary = run("clip", out, "--steps", "25", "--shapes.size", "16", "--lr", "3e-3", "--eval_every", "25")
    return cfg, summary


def test_clip_learns_evaluates_and_keeps_its_tokenizer(clip_run, tmp_path):
    cfg, summary = clip_run
    assert falls([r["loss"] for r in metrics(cfg.out)])
    ev = metrics(cfg.out, "eval")[-1]
    assert ev["n"] == 64 and ev["classes"] == 8 and ev["prompts"] == 24 and 0 <= ev["top1"] <= 1
    assert summary["eval"]["chance"] == ev["chance"] > 0
    saved = tok_mod.load(os.path.join(cfg.out, "tokenizer.json"))
    ckpt = ckpt_mod.load(summary["checkpoint"])
    assert isinstance(saved, tok_mod.WordTokenizer) and ckpt["task"][0]["tokenizer"] == saved.to_dict()
    assert "a" in saved.vocab and ckpt["model"]["token_embedding.weight"].shape[0] == saved.vocab_size
    assert evaluate_checkpoint(cfg.out)["top1"] == pytest.approx(ev["top1"])

    # an ImageFolder whose folder names are the classes: zero-shot with CLIP's prompt ensemble
    shapes = Shapes("val", 40, 32)
    for i in range(40):
        s = shapes[i]
        if SHAPES[s["label"]] in ("circle", "square"):
            os.makedirs(tmp_path / "folder" / SHAPES[s["label"]], exist_ok=True)
            Image.fromarray(s["image"]).save(tmp_path / "folder" / SHAPES[s["label"]] / f"{i}.png")
    n = sum(len(f) for _, _, f in os.walk(tmp_path / "folder"))
    folder = evaluate_checkpoint(cfg.out, overrides=["--val_data", str(tmp_path / "folder"), "--num_workers", "0"])
    assert folder["classes"] == 2 and folder["prompts"] == 7 and folder["n"] == n
    assert kfe_main(["eval", cfg.out, "--num_workers", "0"]) == 0

    # a checkpoint whose tokenizer is not the one this data builds is refused, naming both
    ckpt["task"][0]["tokenizer"] = {"kind": "word", "vocab": ["circle"]}
    bad = str(tmp_path / "bad.pt")
    ckpt_mod.atomic_save(ckpt, bad)
    with pytest.raises(ConfigError, match="tokenizer .* differs"):
        evaluate_checkpoint(bad)


def test_slip_loss_falls(tmp_path):
    cfg, summary = run("slip", tmp_path / "run", "--steps", "25", "--shapes.size", "16", "--lr", "3e-3",
                       "--ssl_mlp_dim", "64", "--ssl_emb_dim", "16")
    assert falls([r["loss"] for r in metrics(cfg.out)])
    assert "prompts" in summary["eval"] and summary["checkpoint"].endswith("ckpt-00000025.pt")


def test_slip_simclr_loss_is_nt_xent_on_one_process():
    from models.clip import nt_xent
    from train.recipes.slip import simclr_loss

    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(simclr_loss(z1, z2, 0.1), nt_xent(z1.float(), z2.float(), 0.1))


def test_slip_head_batchnorm_is_synced_on_multi_process_gpu_runs():
    # SLIP's models.py builds image_mlp with nn.SyncBatchNorm; torch's SyncBatchNorm refuses CPU tensors in
    # a multi-process group, so only multi-process GPU runs convert (one process: plain BN is the same).
    import models
    from train.dist import DistInfo
    from train.recipes.slip import sync_batchnorm

    def tiny():
        return models.create_model("slip_vit_small_patch16", img_size=32, vision={"depth": 1, "embed_dim": 24},
                                   transformer_layers=1, transformer_width=16, transformer_heads=2, vocab_size=20,
                                   context_length=8, embed_dim=8, ssl_mlp_dim=16, ssl_emb_dim=8)
    plain = tiny()
    synced = sync_batchnorm(tiny(), DistInfo(rank=1, world=2, local_rank=1, device=torch.device("cuda", 1)))
    assert all(isinstance(m, torch.nn.SyncBatchNorm) for m in (synced.image_mlp.bn1, synced.image_mlp.bn2))
    assert synced.state_dict().keys() == plain.state_dict().keys()          # checkpoints load either way
    for info in (DistInfo(world=1, device=torch.device("cuda", 0)), DistInfo(rank=0, world=2)):   # 1 GPU; CPU gloo
        bn = sync_batchnorm(tiny(), info).image_mlp.bn1
        assert type(bn) is torch.nn.BatchNorm1d


def test_slip_views_are_deterministic_uint8_and_differ():
    from train.data.simclr import SlipViews, _hue_shift
    from train.data.transforms import make_transform, normalize

    views = SlipViews(make_transform(32, "none"), 32)
    img = Shapes("train", 4, 32)[1]["image"]
    a, b = views(img, np.random.default_rng(3)), views(img, np.random.default_rng(3))
    assert a.shape == (3, 3, 32, 32) and a.dtype == torch.uint8 and torch.equal(a, b)  # (C, view, H, W)
    assert torch.equal(a[:, 0], torch.from_numpy(img).permute(2, 0, 1)) and not torch.equal(a[:, 1], a[:, 2])
    batch = normalize(a[None], torch.device("cpu"))           # as the trainer prepares a SLIP batch
    for v in range(3):                                         # every view normalised per colour channel
        torch.testing.assert_close(batch[:, :, v], normalize(a[None, :, v], torch.device("cpu")))
    red = np.zeros((3, 2, 2), np.float32)
    red[0] = 1
    np.testing.assert_allclose(_hue_shift(red, 1 / 3), red[[2, 0, 1]], atol=1e-6)   # red -> green
    np.testing.assert_allclose(_hue_shift(red * 0.5 + 0.2, 0.0), red * 0.5 + 0.2, atol=1e-6)


def test_bow_captions_vocabulary_and_training(tmp_path):
    cfg, _ = resolve_config("clip", overrides=["--data", "shapes", "--captions", "bow"])
    tok = tok_mod.WordTokenizer.build(["a small red circle", "the blue square"])
    cap = Captioner(cfg, tok)
    batch = {"caption": ["a large striped red triangle above a small blue circle"] * 2, "index": torch.tensor([4, 5])}
    texts = cap.texts(batch, step=7)
    assert all(sorted(t.split()) == sorted(bag_of_words(batch["caption"][0])) for t in texts)
    assert cap.texts(batch, step=7) == texts and STOP_WORDS.isdisjoint(texts[0].split())
    assert any(cap.texts(batch, step=s) != texts for s in range(8, 12))  # reshuffled per step
    cfg, summary = run("clip", tmp_path / "bow", "--steps", "3", "--captions", "bow", "--bow_t", "0.5")
    vocab = tok_mod.load(os.path.join(cfg.out, "tokenizer.json")).vocab
    assert STOP_WORDS.isdisjoint(vocab) and "circle" in vocab and summary["eval"]["prompts"] == 24


def test_pseudo_bow_captions_then_training_on_them(clip_run, tmp_path, capsys):
    cfg, _ = clip_run
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    shapes = Shapes("val", 16, 32)
    for i in range(16):
        Image.fromarray(shapes[i]["image"]).save(folder / f"img{i:02d}.png")
    out = str(tmp_path / "captions.jsonl")
    records = assign(cfg.out, str(folder), k=3, out=out)
    vocab = set(tok_mod.load(os.path.join(cfg.out, "tokenizer.json")).vocab) - STOP_WORDS
    assert [r["index"] for r in records] == list(range(16)) and records[3]["id"].endswith("img03.png")
    for r in records:
        words = r["caption"].split()
        assert len(set(words)) == 3 and set(words) <= vocab and r["scores"] == sorted(r["scores"], reverse=True)
    assert [json.loads(line) for line in open(out)] == records
    assert kfe_main(["pseudo-bow", cfg.out, "--data", str(folder), "--out", out, "--k", "2"]) == 0
    assert "wrote 16 pseudo-BoW captions" in capsys.readouterr().out

    with pytest.raises(DataError, match="unlabelled ImageFolder"):
        run("clip", tmp_path / "nocap", "--data", str(folder), "--steps", "1")
    cfg2, summary = run("clip", tmp_path / "pseudo", "--data", str(folder), "--captions_file", out, "--steps", "2",
                        "--val_data", "shapes", "--tokenizer", "word")
    assert len(metrics(cfg2.out)) == 2 and summary["eval"]["classes"] == 8
    assert set(tok_mod.load(os.path.join(cfg2.out, "tokenizer.json")).vocab) <= vocab


def test_pseudo_bow_captions_shapes_beyond_the_runs_own_images(clip_run):
    # The run trained on 16 shapes images; overrides reach its config, so images 16.. (never seen with
    # a caption: A Fistful of Words' extra caption-less data) get pseudo-captions too, and they are the
    # same images as a 16-image split's (shapes draws image i from (seed, split, i) alone).
    cfg, _ = clip_run
    records = assign(cfg.out, "shapes", k=2, overrides=["--shapes.size", "40"])
    assert [r["index"] for r in records] == list(range(40))
    assert [r["caption"] for r in records[:16]] == [r["caption"] for r in assign(cfg.out, "shapes", k=2)]


def test_bench_recipe_clip_uses_the_recipes_own_model(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert kfe_main(["bench", "recipe", "clip", "--sizes", "32x8", "--warmup", "1", "--repeats", "2",
                     "--json", str(out)]) == 0
    (rec,) = json.loads(out.read_text())
    assert rec["recipe"] == "clip" and rec["model"] == "clip_vit_small_patch16" and rec["batch"] == 8
    assert rec["loader_images_per_s"] > 0 and rec["train_images_per_s"] > 0 and rec["train_flops_per_image"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["clip", "slip"])
def test_gpu_bf16_real_size_loss_falls(tmp_path, recipe):
    # ViT-S/16 towers at 224 px (CLIP's text tower: 12 blocks, width 512, context 77), bf16 autocast, fused AdamW
    from train.run import train

    def over(device, steps):
        return ["--data", "shapes", "--device", device, "--model", f"{recipe}_vit_small_patch16", "--resolution",
                "224", "--batch_size", "64", "--shapes.size", "64", "--steps", str(steps), "--warmup_steps", "3",
                "--lr", "5e-4", "--log_every", "1", "--progress", "false", "--num_workers", "4", "--vocab_samples",
                "2000", "--out", str(tmp_path / device), "--model_kwargs", "{}", "--context_length", "77",
                "--threads", "0"]

    cfg, preset = resolve_config(recipe, overrides=over("cuda", 25))
    summary = train(recipe, cfg, preset)
    recs = metrics(cfg.out)
    assert falls([r["loss"] for r in recs], 0.8) and recs[-1]["tflops"] > 0 and recs[-1]["mem_gb"] > 0
    # The first step (same batch, same initial towers) against one fp32 step on the CPU: bf16's 1e-2.
    cpu_cfg, cpu_preset = resolve_config(recipe, overrides=over("cpu", 1))
    train(recipe, cpu_cfg, cpu_preset)
    first = metrics(cpu_cfg.out)[0]["loss"]
    assert abs(recs[0]["loss"] - first) <= 1e-2 * first, (recs[0]["loss"], first)
    assert cfg.precision == "auto" and summary["eval"]["n"] == 1000


# ---- clip's paper defaults: SLIP's CLIP baseline (the comparison SLIP makes), through the built trainer

def test_paper_defaults_are_slips_clip_baseline(tmp_path):
    """SLIP's README "CLIP ViT-Base with 8-nodes (batch size 4096)": lr 5e-4, weight decay 0.5; main.py:
    25 epochs, 1 warmup epoch, AdamW betas (0.9, 0.98), cosine to 1e-5; CLIP view crop scale (0.5, 1)."""
    from tests.train.clip_util import TINY
    from tests.train.util import built_trainer, group_names

    cfg, preset = resolve_config("clip", overrides=["--data", "/data/yfcc15m"])
    assert preset == "paper" and cfg.model == "clip_vit_base_patch16" and cfg.batch_size == 4096
    assert cfg.blr * cfg.batch_size / 256 == pytest.approx(5e-4) and cfg.weight_decay == 0.5
    assert (cfg.epochs, cfg.warmup_epochs, cfg.min_lr, tuple(cfg.betas)) == (25.0, 1.0, 1e-5, (0.9, 0.98))
    assert cfg.crop_min_scale == 0.5 and cfg.context_length == 77
    t = built_trainer("clip", tmp_path, "--data", "shapes", *TINY, "--batch_size", "32", preset="paper")
    assert t.lr == pytest.approx(3.125e-5 * 32 / 256) and t.optimizer.defaults["betas"] == (0.9, 0.98)
    (wd, decay), (no_wd, no_decay) = group_names(t)
    assert (wd, no_wd) == (0.5, 0.0) and "logit_scale" in no_decay   # not on the temperature
    assert {"image_projection", "text_projection", "visual.blocks.0.attn.qkv.weight"} <= decay
