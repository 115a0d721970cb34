"""`kfe eval --zeroshot` (train/zeroshot.py): OpenAI's protocol (templates averaged in embedding space,
top-1 / top-5) on the shapes val split with user templates, on a tiny ImageFolder, for the SLIP-layout
and the OpenAI-layout (MetaCLIP) models."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import models
from tests.train.clip_util import run
from tests.train.util import kfe
from train import zeroshot
from train.data import DataError
from train.data.clip_bpe import ClipBPETokenizer
from train.dist import DistInfo
from train.eval import prompts, zero_shot_weights
from train.recipes.image_text import default_templates

EVAL = ["--device", "cpu", "--num_workers", "0"]
METACLIP_TINY = {"embed_dim": 32, "patch_size": 8, "vision_width": 32, "vision_layers": 1, "vision_head_width": 16,
                 "transformer_width": 32, "transformer_layers": 1, "transformer_heads": 2}


def test_shipped_imagenet_prompts_and_wordnet_names():
    spec = zeroshot.imagenet()
    assert len(spec["classnames"]) == 1000 and len(spec["templates"]) == 80
    assert spec["classnames"][:2] == ["tench", "goldfish"] and spec["templates"][0] == "a bad photo of a {}."
    assert all(t.count("{}") == 1 for t in spec["templates"])
    wnids = [f"n{i:08d}" for i in range(1000)]
    assert zeroshot.class_names(wnids) == spec["classnames"]
    assert zeroshot.class_names(["red_circle", "blue"]) == ["red circle", "blue"]


def test_bad_json_is_a_clear_error(tmp_path):
    bad = tmp_path / "z.json"
    bad.write_text('{"templates": "a {}"}')
    with pytest.raises(DataError, match="templates"):
        zeroshot.read_spec(str(bad))
    bad.write_text('{"prompts": ["a {}"]}')
    with pytest.raises(DataError, match="keys"):
        zeroshot.read_spec(str(bad))
    with pytest.raises(DataError, match="no such JSON"):
        zeroshot.read_spec(str(tmp_path / "missing.json"))


def test_templates_are_averaged_in_embedding_space():
    torch.manual_seed(0)
    model = models.create_model("metaclip_vit_b32", image_size=32, **METACLIP_TINY).eval()
    tok = ClipBPETokenizer()
    names, templates = ["red circle", "blue square", "green star", "cat", "dog", "tench"], ["a {}.", "a photo of {}",
                                                                                          "itap of the {}"]
    images, labels = torch.randn(12, 3, 32, 32), torch.arange(12) % 6
    batches = [{"image": images[:7], "label": labels[:7]}, {"image": images[7:], "label": labels[7:]}]
    out = zeroshot.evaluate(model, tok, 77, names, templates, batches, lambda b: b, DistInfo())
    with torch.no_grad():  # the protocol written out: normalise each prompt, mean per class, normalise
        cls = torch.stack([F.normalize(F.normalize(model.encode_text(tok([t.replace("{}", n) for t in templates], 77)),
                                                   dim=-1).mean(0), dim=0) for n in names])
        logits = F.normalize(model.encode_image(images), dim=-1) @ cls.T
        # the class embeddings evaluate() scores with: the same tensor
        weights = zero_shot_weights(lambda t: model.encode_text(tok(t, 77)), prompts(names, templates))
        assert float((weights - cls).norm() / cls.norm()) <= 1e-6
        raw = model.encode_text(tok(names, 77)).norm(dim=-1)
        assert raw.max() > 1.05 * raw.min()  # prompt norms differ: normalising before the mean matters
    top1 = (logits.argmax(-1) == labels).double().mean().item()
    top5 = (logits.topk(5, -1).indices == labels[:, None]).any(-1).double().mean().item()
    assert (out["top1"], out["top5"], out["n"], out["classes"], out["templates"]) == (top1, top5, 12, 6, 3)
    assert 0 < top5 < 1  # a case where top-5 is not trivially 0 or 1


def test_user_templates_on_shapes_val_match_the_recipe_eval(tmp_path):
    cfg, _ = run("clip", tmp_path / "r", "--steps", "4", "--shapes.label", "color")
    own = default_templates(cfg, "shapes")  # the recipe's own evaluation uses these prompts
    spec = tmp_path / "own.json"
    spec.write_text(json.dumps({"templates": own}))
    with open(os.path.join(tmp_path / "r", "metrics.jsonl")) as f:
        recipe_top1 = [r for r in map(json.loads, f) if r["kind"] == "eval"][-1]["top1"]
    got = zeroshot.evaluate_checkpoint(str(tmp_path / "r"), str(spec), overrides=EVAL)
    assert got["top1"] == pytest.approx(recipe_top1) and got["n"] == 64 and got["classes"] == 8
    assert got["top5"] >= got["top1"]
    user = tmp_path / "user.json"
    user.write_text(json.dumps({"templates": ["a {} thing", "something {}"]}))
    other = zeroshot.evaluate_checkpoint(str(tmp_path / "r"), str(user), overrides=EVAL)
    assert other["templates"] == 2 and other["n"] == 64


def _image_folder(root, classes, per_class=2):
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(root / c)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


@pytest.mark.slow  # ~15-25 s: a training run in process, then `kfe eval` in a subprocess
def test_metaclip_run_zero_shot_on_a_tiny_image_folder(tmp_path):
    run("clip", tmp_path / "r", "--steps", "2", "--model", "metaclip_vit_b32", "--tokenizer", "clip",
        "--context_length", "77", "--model_kwargs", json.dumps(METACLIP_TINY))
    classes = ["red_circle", "blue_square", "green_star", "cat", "dog", "tench", "goldfish"]
    _image_folder(tmp_path / "folder", classes)
    res = kfe("eval", str(tmp_path / "r"), "--zeroshot", str(tmp_path / "folder"), *EVAL)
    assert res.returncode == 0, res.stderr[-3000:]
    line = res.stdout.strip().splitlines()[-1]
    assert "zero-shot top-1" in line and "top-5" in line and "14 images, 7 classes x 80 templates" in line, line


def test_zero_shot_on_labelled_webdataset_shards_with_json_class_names(tmp_path):
    from tests.train.util import write_shards

    run("clip", tmp_path / "r", "--steps", "2", "--shapes.label", "color")
    write_shards(str(tmp_path / "shards"), 2, 6, label=True)  # .cls labels 0..2
    spec = tmp_path / "wds.json"
    spec.write_text(json.dumps({"data": str(tmp_path / "shards" / "{00000..00001}.tar"),
                                "classnames": ["red", "green", "blue"], "templates": ["a {} shape"]}))
    got = zeroshot.evaluate_checkpoint(str(tmp_path / "r"), str(spec), overrides=EVAL)
    assert (got["n"], got["classes"], got["templates"]) == (12, 3, 1) and "top5" not in got  # top-5 needs 5 classes
    spec.write_text(json.dumps({"data": str(tmp_path / "shards" / "{00000..00001}.tar")}))
    with pytest.raises(DataError, match="class names"):
        zeroshot.evaluate_checkpoint(str(tmp_path / "r"), str(spec), overrides=EVAL)


@pytest.mark.parametrize("hw", [(48, 70), (70, 48), (48, 71), (71, 48), (33, 97), (31, 45), (32, 32)])
def test_metaclip_eval_images_equal_open_clips_preprocessing(hw):
    """Resize (bicubic, shorter side to the crop) + centre crop + CLIP's mean / std: open_clip's
    image_transform(is_train=False), pixel for pixel (torchvision's sizes and crop offsets)."""
    open_clip = pytest.importorskip("open_clip")
    from train.data.transforms import make_transform, normalize
    from train.recipes.image_text import CLIP_MEAN, CLIP_STD, eval_crop_pct

    class Cfg:
        model = "metaclip_vit_b32"
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (*hw, 3), dtype=np.uint8))
    ours = make_transform(32, "none", crop_pct=eval_crop_pct(Cfg))(img, np.random.default_rng(0))
    ours = normalize(ours[None], torch.device("cpu"), False, CLIP_MEAN, CLIP_STD)[0]
    torch.testing.assert_close(ours, open_clip.image_transform(32, is_train=False)(img), rtol=0, atol=1e-6)
