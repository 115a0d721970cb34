"""The built-in shapes dataset: deterministic, any resolution, labels and captions agree, splits differ."""
import numpy as np
import pytest

from train.data import shapes as S


def test_deterministic_by_seed_split_and_index():
    a, b = S.Shapes("train", 100, 48), S.Shapes("train", 100, 48)
    assert np.array_equal(a[7]["image"], b[7]["image"]) and a[7]["caption"] == b[7]["caption"]
    assert not np.array_equal(a[7]["image"], a[8]["image"])
    assert not np.array_equal(a[7]["image"], S.Shapes("val", 100, 48)[7]["image"])
    assert not np.array_equal(a[7]["image"], S.Shapes("train", 100, 48, seed=1)[7]["image"])


@pytest.mark.parametrize("res", [16, 33, 64, 224])
def test_any_resolution(res):
    img = S.Shapes("train", 10, res)[3]["image"]
    assert img.shape == (res, res, 3) and img.dtype == np.uint8 and img.std() > 5


def test_labels_captions_and_balance():
    ds = S.Shapes("train", 400, 32)
    labels = []
    for i in range(400):
        s = ds[i]
        scene, _ = ds.scene(i)
        main = scene["objects"][0]
        assert s["label"] == main["shape"] == S.label_of(scene, "shape")
        assert S.SHAPES[main["shape"]] in s["caption"] and S.COLOR_NAMES[main["color"]] in s["caption"]
        if len(scene["objects"]) == 2:           # the main object is strictly larger, so it is identifiable
            assert main["size"] > scene["objects"][1]["size"]
            assert any(rel in s["caption"] for rel in S.RELATIONS)
        labels.append(s["label"])
    counts = np.bincount(labels, minlength=8)
    assert counts.min() > 25                     # every class present, roughly uniform (chance ~1/8)
    color = S.Shapes("train", 10, 32, label="shape_color")
    assert len(color.class_names) == 64 and 0 <= color[0]["label"] < 64


def test_two_object_placement_matches_the_relation():
    ds = S.Shapes("val", 300, 32)
    checked = 0
    for i in range(300):
        scene, _ = ds.scene(i)
        if scene["relation"] is None:
            continue
        (mx, my), (ox, oy) = scene["objects"][0]["xy"], scene["objects"][1]["xy"]
        dx, dy = S.RELATIONS[scene["relation"]]
        assert (mx - ox) * dx >= 0 and (my - oy) * dy >= 0
        for o in scene["objects"]:                # fully inside the image
            r = S.SIZES[S.SIZE_NAMES[o["size"]]] * o["jitter"]
            assert r <= o["xy"][0] <= 1 - r and r <= o["xy"][1] <= 1 - r
        checked += 1
    assert checked > 100


def test_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        S.Shapes("test")
    with pytest.raises(ValueError, match="resolution must be >= 16"):
        S.Shapes(resolution=8)
    with pytest.raises(IndexError):
        S.Shapes(size=5)[5]


def test_position_label_is_where_the_main_object_is_drawn():
    # The label names the 3 x 3 cell of the main object's centre: single-object captions end with its class
    # name, and the centroid of the drawn object's pixels falls in that cell (x and y not swapped).
    ds = S.Shapes("val", 300, 48, label="position")
    assert ds.class_names == list(S.POSITIONS) and len(set(S.POSITIONS)) == 9
    agree = singles = 0
    for i in range(300):
        s = ds[i]
        scene, _ = ds.scene(i)
        if len(scene["objects"]) != 1:
            continue
        singles += 1
        assert s["caption"].endswith(" " + S.POSITIONS[s["label"]])
        ys, xs = np.nonzero(s["image"].max(-1) > 100)          # the object (the background is dark)
        row = 0 if ys.mean() / 48 < 0.38 else 2 if ys.mean() / 48 > 0.62 else 1
        col = 0 if xs.mean() / 48 < 0.38 else 2 if xs.mean() / 48 > 0.62 else 1
        agree += s["label"] == 3 * row + col
    counts = np.bincount([ds[i]["label"] for i in range(300)], minlength=9)
    assert singles > 100 and agree > 0.85 * singles and counts.min() > 10
