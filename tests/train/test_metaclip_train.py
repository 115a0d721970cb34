"""MetaCLIP end to end: a small WebDataset pool -> `kfe curate metaclip` -> `kfe train clip` on the curated
set (train/data/curated.py streams exactly the kept pairs) -> `kfe export` -> open_clip loads it; and
KFE never imports open_clip at run time."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.train.util import ROOT, env, jpeg
from train.curation.metaclip import curate
from train.data import DataError, kind_of
from train.data.curated import CuratedStream, kept_offsets
from train.data.transforms import make_transform

METADATA = ["cat", "dog", "tench", "red car"]
WORDS = ["cat", "cat", "cat", "cat", "dog", "dog", "tench", "red car", "kettle", "xyzzy"]
TINY = {"embed_dim": 16, "patch_size": 16, "vision_width": 32, "vision_layers": 1, "vision_head_width": 16,
        "transformer_width": 32, "transformer_layers": 1, "transformer_heads": 2}


def write_pool(folder, shards=3, per_shard=10, with_ids=True) -> dict:
    """img2dataset-style shards; returns {pair id as curation names it: caption}."""
    import webdataset as wds

    os.makedirs(folder, exist_ok=True)
    captions = {}
    for s in range(shards):
        path = os.path.join(folder, f"{s:05d}.tar")
        with wds.TarWriter(path) as w:
            for k in range(per_shard):
                n = s * per_shard + k
                caption = f"a photo of a {WORDS[n % len(WORDS)]} number {n}"
                sample = {"__key__": f"{n:06d}", "jpg": jpeg(7 * n), "txt": caption}
                if with_ids:
                    sample["json"] = json.dumps({"id": f"pair-{n}"}).encode()
                w.write(sample)
                captions[f"pair-{n}" if with_ids else f"{path}:{k}"] = caption
    return captions


def kept_captions(out, captions) -> set:
    with open(os.path.join(out, "curated.jsonl")) as f:
        return {captions[json.loads(line)["id"]] for line in f}


@pytest.mark.parametrize("with_ids", [True, False])
def test_curated_stream_yields_exactly_the_kept_pairs(tmp_path, with_ids):
    captions = write_pool(str(tmp_path / "pool"), with_ids=with_ids)
    out = str(tmp_path / "curated")
    summary = curate(METADATA, [str(tmp_path / "pool" / "{00000..00002}.tar")], out, t=2, workers=1,
                     id_field="id" if with_ids else None)
    kept = kept_captions(out, captions)
    assert 0 < summary["kept"] == len(kept) < summary["matched"] < summary["pool_size"] == 30  # balancing dropped some
    assert kind_of(out) == "curated"
    shards, offsets = kept_offsets(out)
    stream = CuratedStream(shards, offsets, ("image", "caption"), make_transform(16, "none"), loop=False)
    seen = [s["caption"] for s in stream if "_bad" not in s]
    assert sorted(seen) == sorted(kept)
    assert all(s["image"].shape == (3, 16, 16) for s in CuratedStream(shards, offsets, ("image", "caption"),
                                                                      make_transform(16, "none"), loop=False)
               if "_bad" not in s)


def test_curated_dir_errors_are_clear(tmp_path):
    write_pool(str(tmp_path / "pool"))
    out = str(tmp_path / "curated")
    curate(METADATA, [str(tmp_path / "pool" / "{00000..00002}.tar")], out, t=2, workers=1)
    os.remove(tmp_path / "pool" / "00001.tar")
    with pytest.raises(DataError, match="is gone"):
        kept_offsets(out)
    os.remove(os.path.join(out, "_work", "job.json"))
    with pytest.raises(DataError, match="job.json"):
        kept_offsets(out)


@pytest.mark.slow  # ~10-20 s: curation, 3 training steps, export, open_clip
def test_curate_train_export_load_into_open_clip(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from train.run import export_checkpoint, resolve_config, train

    write_pool(str(tmp_path / "pool"))
    out = str(tmp_path / "curated")
    curate(METADATA, [str(tmp_path / "pool" / "{00000..00002}.tar")], out, t=2, workers=1)
    threads = torch.get_num_threads()
    try:
        cfg, preset = resolve_config("clip", overrides=[
            "--data", out, "--model", "metaclip_vit_b32", "--model_kwargs", json.dumps(TINY), "--resolution", "32",
            "--batch_size", "4", "--steps", "3", "--num_workers", "0", "--progress", "false", "--threads", "1",
            "--out", str(tmp_path / "run")])
        assert preset == "metaclip_vit_b32" and cfg.tokenizer == "clip" and cfg.weight_decay == 0.2
        summary = train("clip", cfg, preset)
    finally:
        torch.set_num_threads(threads)
    assert summary["step"] == 3 and torch.isfinite(torch.tensor(summary["final_loss"]))
    sd = export_checkpoint(str(tmp_path / "run"), str(tmp_path / "w.safetensors"))
    from open_clip.model import CLIP

    theirs = CLIP(embed_dim=16, quick_gelu=True, vision_cfg=dict(image_size=32, patch_size=16, width=32, layers=1,
                                                                 head_width=16),
                  text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    from models import load_pretrained

    load_pretrained(theirs, str(tmp_path / "w.safetensors"))  # strict: exactly open_clip's keys
    text = open_clip.tokenize(["a photo of a cat"])
    with torch.no_grad():
        ours = sd["text_projection"]  # the exported tensors are the trained ones
        assert torch.equal(theirs.text_projection, ours)
        assert torch.isfinite(theirs.encode_text(text)).all()


@pytest.mark.slow  # ~14 s: a subprocess that imports torch and trains one step
def test_train_never_imports_open_clip(tmp_path):
    """`kfe train clip --model metaclip_vit_b32 --tokenizer clip` runs a step without importing open_clip."""
    from tests.train.util import write_shards

    write_shards(str(tmp_path / "shards"), 1, 8)
    code = ("import sys; from train.cli import main; rc = main(sys.argv[1:]); "
            "assert rc == 0, rc; assert 'open_clip' not in sys.modules, 'open_clip was imported'; print('OK')")
    args = ["train", "clip", "--model", "metaclip_vit_b32", "--tokenizer", "clip", "--data",
            str(tmp_path / "shards" / "00000.tar"), "--model_kwargs", json.dumps(TINY), "--resolution", "32",
            "--batch_size", "4", "--steps", "1", "--num_workers", "0", "--progress", "false", "--threads", "1",
            "--out", str(tmp_path / "run")]
    res = subprocess.run([sys.executable, "-c", code, *args], env=env(), cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), (res.stdout[-2000:], res.stderr[-3000:])


@pytest.mark.parametrize("size,lr", [("b32", 5e-4), ("b16", 5e-4), ("l14", 4e-4), ("h14", 4e-4), ("bigg14", 4e-4)])
def test_metaclip_presets_are_the_papers_and_picked_from_the_model(size, lr):
    """MetaCLIP run_configs_400m.py / run_configs_2_5B.py + CLIP's hyperparameter tables (see clip.py)."""
    from train.run import resolve_config

    cfg, preset = resolve_config("clip", overrides=["--model", f"metaclip_vit_{size}", "--data", "x/{0..9}.tar"])
    assert preset == f"metaclip_vit_{size}"
    assert (cfg.batch_size, cfg.lr, cfg.warmup_steps, cfg.weight_decay, cfg.epochs, cfg.samples_per_epoch) == \
        (32768, lr, 2000, 0.2, 32.0, 400_000_000)
    assert (tuple(cfg.betas), cfg.min_lr, cfg.resolution, cfg.crop_min_scale, cfg.tokenizer, cfg.context_length) == \
        ((0.9, 0.98), 0.0, 224, 0.9, "clip", 77)
    paper, preset = resolve_config("clip", "", "paper", ["--model", f"metaclip_vit_{size}"])
    assert preset == "paper" and (paper.batch_size, paper.weight_decay, paper.epochs) == (4096, 0.5, 25.0)  # SLIP's


def test_pretrained_loads_released_weights_into_the_recipe_model(tmp_path):
    open_clip = pytest.importorskip("open_clip")  # noqa: F841
    from open_clip.model import CLIP

    from train.config import ConfigError
    from train.data.clip_bpe import ClipBPETokenizer
    from train.recipes.image_text import build_model
    from train.run import resolve_config

    theirs = CLIP(embed_dim=16, quick_gelu=True, vision_cfg=dict(image_size=32, patch_size=16, width=32, layers=1,
                                                                 head_width=16),
                  text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    torch.save({"state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()}}, tmp_path / "w.pt")
    over = ["--model", "metaclip_vit_b32", "--model_kwargs", json.dumps(TINY), "--resolution", "32",
            "--data", "x/{0..1}.tar", "--pretrained", str(tmp_path / "w.pt")]
    cfg, _ = resolve_config("clip", overrides=over)
    model = build_model(cfg, ClipBPETokenizer())
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in model.state_dict().items())
    cfg.pretrained = str(tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="--pretrained"):
        build_model(cfg, ClipBPETokenizer())


def test_model_kwargs_of_the_other_layout_are_a_clear_error():
    from train.config import ConfigError
    from train.data.clip_bpe import ClipBPETokenizer
    from train.recipes.image_text import build_model
    from train.run import resolve_config

    cfg, preset = resolve_config("clip", overrides=["--data", "shapes", "--model", "metaclip_vit_b32"])
    assert preset == "shapes"  # its model_kwargs are the SLIP layout's ("vision": {...})
    with pytest.raises(ConfigError, match="do not fit metaclip_vit_b32"):
        build_model(cfg, ClipBPETokenizer(), "meta")
