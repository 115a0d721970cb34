"""`kfe train cit`: the loss falls on shapes, a resumed run continues on exactly the same curated batches
(the buffer is in the checkpoint), WebDataset pools with a metadata file, the frozen image tower."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from tests.train.clip_util import falls, run
from tests.train.util import metrics, write_shards
from train import checkpoint as ckpt_mod
from train.data import DataError
from train.recipes.cit import image_to_text_loss


def test_cit_loss_falls_and_reports_curation(tmp_path, capsys):
    cfg, summary = run("cit", tmp_path / "run", "--steps", "24", "--shapes.size", "16", "--lr", "3e-3",
                       "--curate_every", "4", "--min_ratio", "0.5")
    assert falls([r["loss"] for r in metrics(cfg.out)])
    ev = summary["eval"]
    assert ev["curation_rounds"] == 6 and 0 < ev["curated_ratio"] <= 1 and ev["pool_scored"] >= 64
    assert "curation round 6 kept" in capsys.readouterr().out


def test_image_to_text_loss_is_cits_cross_entropy():
    g = torch.Generator().manual_seed(0)
    img, txt = F.normalize(torch.randn(5, 8, generator=g), dim=-1), F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    expected = -torch.log_softmax(10.0 * img @ txt.T, dim=1).diagonal().mean()
    torch.testing.assert_close(image_to_text_loss(img, txt, torch.tensor(10.0)), expected)


CUT = ["--steps", "8", "--curate_every", "3", "--ckpt_every", "4", "--keep_ckpts", "0", "--deterministic",
       "--shapes.size", "64", "--threshold", "0.9", "--min_ratio", "0.3", "--lr", "3e-3"]


def test_cit_resumes_on_the_same_curated_batches(tmp_path):
    out = tmp_path / "run"
    cfg, _ = run("cit", out, *CUT)
    first = ckpt_mod.load(ckpt_mod.path_for(cfg.out, 8))
    curve = [(r["step"], r["loss"], r["grad_norm"]) for r in metrics(cfg.out)]
    mid = ckpt_mod.load(ckpt_mod.path_for(cfg.out, 4))["task"][0]["curator"]
    assert mid["pos"] == 1 and mid["rounds"] == 2 and len(mid["round"]) == 48 and not mid["stream"]
    os.remove(ckpt_mod.path_for(cfg.out, 8))           # as if killed after the step-4 checkpoint
    run("cit", out, *CUT, "--resume", "auto")
    again = ckpt_mod.load(ckpt_mod.path_for(cfg.out, 8))
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in metrics(cfg.out)] == curve
    for name, p in first["model"].items():
        assert torch.equal(again["model"][name], p), name
    assert again["task"] == first["task"] and again["data"] == first["data"]

    # a frozen vision tower initialised from that run's weights does not move; the text tower does
    cfg2, _ = run("cit", tmp_path / "frozen", "--steps", "2", "--curate_every", "2", "--init_image", cfg.out,
                  "--freeze_image", "--lr", "3e-3", "--min_ratio", "0.5")
    frozen = ckpt_mod.load(ckpt_mod.path_for(cfg2.out, 2))["model"]
    for name, p in frozen.items():
        if name.startswith("visual."):
            assert torch.equal(p, first["model"][name]), name
    assert not torch.equal(frozen["token_embedding.weight"], first["model"]["token_embedding.weight"])


def test_cit_on_a_webdataset_pool_with_a_metadata_file(tmp_path):
    write_shards(str(tmp_path / "pool"), shards=2, per_shard=8)        # captions "a photo number 000010003"
    (tmp_path / "meta.txt").write_text("photo\nnumber\n")
    spec = str(tmp_path / "pool" / "{00000..00001}.tar")
    cfg, summary = run("cit", tmp_path / "run", "--data", spec, "--metadata", str(tmp_path / "meta.txt"),
                       "--steps", "3", "--batch_size", "4", "--curate_every", "2", "--min_ratio", "0.5",
                       "--tokenizer", "word", "--ckpt_every", "1")
    assert len(metrics(cfg.out)) == 3 and summary["eval"]["curation_rounds"] == 2   # no class names: no zero-shot
    state = ckpt_mod.load(ckpt_mod.path_for(cfg.out, 3))["task"][0]["curator"]
    assert state["stream"] and state["pos"] == 1 and state["round"][0]["caption"].startswith("a photo number")
    with pytest.raises(DataError, match="needs metadata"):
        run("cit", tmp_path / "nometa", "--data", spec, "--steps", "1", "--batch_size", "4")
    (tmp_path / "bad.json").write_text(json.dumps({"not": "a list"}))
    with pytest.raises(DataError, match="is a JSON object"):
        run("cit", tmp_path / "badmeta", "--metadata", str(tmp_path / "bad.json"), "--steps", "1")


def test_cit_bow_captions_are_balanced_with_bow_t():
    from tests.train.clip_util import TINY
    from train.dist import DistInfo
    from train.recipes.cit import RECIPE
    from train.run import resolve_config

    cfg, _ = resolve_config("cit", overrides=["--data", "shapes", *TINY, "--captions", "bow", "--bow_t", "0.05"])
    data = RECIPE.build_data(cfg, DistInfo())
    captioner = RECIPE.build_task(cfg, data, DistInfo()).batches.__self__.captioner
    bal = captioner.bow.balancer
    assert bal is not None and bal.t == 0.05 and bal.num_captions == cfg.vocab_samples
    # a shape name is in ~1 in 4 shapes captions (> t): sub-sampled, as in `kfe train clip`
    assert bal.keep_probability("circle") < 1
    batch = {"caption": ["a small red circle"] * 64, "index": torch.arange(64)}
    assert sum("circle" in t.split() for t in captioner.texts(batch, step=0)) < 64
