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


# ---- paper defaults, the frozen vision tower, the projections' weight decay (built, not trained)

def test_paper_defaults():
    """CiT's official yfcc15m_in1k_mocob16 run (facebookresearch/CiT run_configs.py / configs.py; paper Sec. 4)."""
    from train.run import resolve_config

    cfg, preset = resolve_config("cit", overrides=["--data", "/data/pool"])
    assert preset == "paper"
    assert (cfg.batch_size, cfg.steps, cfg.warmup_steps) == (16384, 5000, 200)    # 1024 x 16 GPUs; 5000 / 25
    assert (cfg.lr, cfg.min_lr, cfg.weight_decay, cfg.head_weight_decay) == (5e-4, 1e-5, 0.2, 1.0)
    assert tuple(cfg.betas) == (0.9, 0.999)
    assert (cfg.curate_every, cfg.threshold, cfg.min_ratio) == (100, 0.55, 0.003)
    assert list(cfg.metadata_templates) == ["{}"] and cfg.curate_space == "text" and cfg.loss == "image_to_text"
    assert cfg.freeze_image is None and cfg.init_image == ""   # frozen as soon as --init_image gives a tower


def _task(tmp_path, *extra, preset="auto"):
    from tests.train.clip_util import TINY
    from train.dist import DistInfo
    from train.recipes.cit import RECIPE
    from train.run import resolve_config

    cfg, _ = resolve_config("cit", overrides=["--data", "shapes", *TINY, "--out", str(tmp_path / "run"), *extra],
                            preset=preset)
    return cfg, RECIPE.build_task(cfg, RECIPE.build_data(cfg, DistInfo()), DistInfo())


@pytest.fixture(scope="module")
def image_tower(tmp_path_factory):
    """A checkpoint holding a (random) vision tower of the tiny model, as a clip run would leave one."""
    tmp = tmp_path_factory.mktemp("tower")
    _, task = _task(tmp)
    path = str(tmp / "tower.pt")
    ckpt_mod.atomic_save({"format": ckpt_mod.FORMAT_VERSION, "model": task.model.state_dict()}, path)
    return path, task.model.state_dict()


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_vision_tower_is_frozen_by_default_when_a_pretrained_one_is_given(tmp_path, image_tower):
    path, sd = image_tower
    cfg, task = _task(tmp_path, "--init_image", path, preset="paper")
    trainable = _trainable(task.model)
    assert not any(n.startswith("visual.") for n in trainable)                   # the paper's frozen tower
    assert {"image_projection", "text_projection", "token_embedding.weight"} <= trainable   # head-all trains
    assert all(torch.equal(task.model.state_dict()[k], v) for k, v in sd.items() if k.startswith("visual."))
    groups = task.param_groups(task.model)
    assert sum(len(g["params"]) for g in groups) == len(trainable)               # nothing frozen is optimised
    _, task = _task(tmp_path, "--init_image", path, "--freeze_image", "false", preset="paper")
    assert "visual.blocks.0.attn.qkv.weight" in _trainable(task.model)           # the override


def test_vision_tower_trains_without_init_image_and_in_the_shapes_preset(tmp_path, image_tower):
    path, _ = image_tower
    _, task = _task(tmp_path, preset="paper")                               # random tower: trains
    assert "visual.blocks.0.attn.qkv.weight" in _trainable(task.model)
    cfg, task = _task(tmp_path, "--init_image", path)                            # shapes preset (auto)
    assert cfg.freeze_image is False and "visual.patch_embed.proj.weight" in _trainable(task.model)
    _, task = _task(tmp_path, "--freeze_image", preset="paper")            # bare flag: frozen
    assert not any(n.startswith("visual.") for n in _trainable(task.model))


def test_weight_decay_groups_put_the_projections_at_head_weight_decay(tmp_path):
    """CiT's optimizer (official main.py): weight decay 0.2, 1.0 on image_projection / text_projection,
    none on 1-D parameters and biases (norms, the temperature, positional biases)."""
    _, task = _task(tmp_path, "--weight_decay", "0.2", "--head_weight_decay", "1.0", preset="paper")
    names = {id(p): n for n, p in task.model.named_parameters()}
    decay, no_decay, head = task.param_groups(task.model)
    assert (decay["weight_decay"], no_decay["weight_decay"], head["weight_decay"]) == (0.2, 0.0, 1.0)
    assert {names[id(p)] for p in head["params"]} == {"image_projection", "text_projection"}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert "logit_scale" in nd and "ln_final.weight" in nd and "visual.blocks.0.attn.qkv.bias" in nd
    d = {names[id(p)] for p in decay["params"]}
    assert "visual.blocks.0.attn.qkv.weight" in d and "token_embedding.weight" in d
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert len(d) + len(nd) + 2 == len(_trainable(task.model))
