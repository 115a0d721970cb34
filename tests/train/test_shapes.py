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
