"""`shapes-parts`: a built-in object + part segmentation dataset drawn on the fly (VLPart's protocol in small).

Each image holds one object made of named parts, each part its own instance mask (every leg, wheel and
window separately, as Pascal Part annotates them). Objects come in two families whose part names are
shared across objects, and each family has base objects and one novel object of a *different geometry*
(not a recoloured base object):

    quadrupeds (head, body, leg, tail): dog, horse (base); cat (novel: rounder body, triangular head with
                                        ears, short legs, long tail curled upwards)
    vehicles (body, wheel, window):     car, truck (base); bus (novel: long tall box, three wheels, a row
                                        of windows)

Every part gets a random colour per instance, so a part is known by its shape and place, never by its
colour (this is also why raw-pixel correspondence fails where learned features work; see
train/vlpart/parse.py). The cross-category protocol of the paper: training annotates base objects with
their object and part masks, novel objects with the object mask and name only; the held-out split
annotates everything. Image i of split s is drawn from SeedSequence([seed, s, i]).

`to_coco(...)` writes any split as COCO JSON (RLE masks) so pycocotools and every other tool read it;
categories carry "name" ("dog" or "dog:head"), "kind" (object | part) and "split" (base | novel).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

FAMILIES = {"quadruped": ("head", "body", "leg", "tail"), "vehicle": ("body", "wheel", "window")}
OBJECTS = {"dog": "quadruped", "horse": "quadruped", "cat": "quadruped",
           "car": "vehicle", "truck": "vehicle", "bus": "vehicle"}
NOVEL = ("cat", "bus")
BASE = tuple(o for o in OBJECTS if o not in NOVEL)
SPLITS = {"train": 0, "val": 1}


def categories() -> list[dict]:
    """COCO categories: objects first, then "object:part" names; ids from 1."""
    cats = [dict(name=o, kind="object", split="novel" if o in NOVEL else "base") for o in OBJECTS]
    cats += [dict(name=f"{o}:{p}", kind="part", split="novel" if o in NOVEL else "base")
             for o, fam in OBJECTS.items() for p in FAMILIES[fam]]
    return [dict(id=i + 1, supercategory=c["name"].split(":")[0], **c) for i, c in enumerate(cats)]


# ---------------------------------------------------------------- drawing: each part a list of primitives

def _ellipse(cx, cy, rx, ry):
    return ("ellipse", (cx - rx, cy - ry, cx + rx, cy + ry))


def _rect(x0, y0, x1, y1):
    return ("rect", (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))


def _poly(*pts):
    return ("poly", tuple(pts))


def _tail(x0, y0, x1, y1, w):
    """A thick line as a polygon (quadrilateral around the segment)."""
    dx, dy = x1 - x0, y1 - y0
    n = math.hypot(dx, dy) or 1.0
    ox, oy = -dy / n * w / 2, dx / n * w / 2
    return _poly((x0 + ox, y0 + oy), (x1 + ox, y1 + oy), (x1 - ox, y1 - oy), (x0 - ox, y0 - oy))


def _layout(name: str, rng: np.random.Generator) -> list[tuple[str, list]]:
    """Parts of one object in a unit frame (x right, y down, object about 1 wide): [(part, primitives)]
    in drawing order (later parts occlude earlier ones)."""
    j = lambda a, b: float(rng.uniform(a, b))  # noqa: E731  (jitter)
    if name in ("dog", "horse"):
        long = name == "horse"
        bw, bh = (0.34, 0.13) if long else (0.30, 0.15)
        leg_h, leg_w = (j(0.30, 0.36) if long else j(0.20, 0.25)), 0.07
        by = 0.0
        legs = [("leg", [_rect(x - leg_w / 2, by + bh * 0.5, x + leg_w / 2, by + bh * 0.5 + leg_h)])
                for x in (-bw * 0.8, -bw * 0.5, bw * 0.5, bw * 0.8)]
        head = (_ellipse(bw + 0.07, by - 0.11, 0.13, 0.065) if long    # long horse head
                else _ellipse(bw + 0.03, by - 0.11, j(0.09, 0.11), j(0.09, 0.11)))
        tail = _tail(-bw * 0.95, by - 0.02, -bw - j(0.12, 0.18), by + j(0.10, 0.18), 0.05)
        return [("tail", [tail])] + legs + [("body", [_ellipse(0, by, bw, bh)]), ("head", [head])]
    if name == "cat":  # novel: round body, short legs, triangle head with ears, tail curled up
        bw, bh = j(0.22, 0.25), j(0.15, 0.17)
        leg_h, leg_w = j(0.10, 0.13), 0.07
        legs = [("leg", [_rect(x - leg_w / 2, bh * 0.7, x + leg_w / 2, bh * 0.7 + leg_h)])
                for x in (-bw * 0.7, -bw * 0.35, bw * 0.35, bw * 0.7)]
        hx, hy, s = bw + 0.05, -bh - 0.02, j(0.11, 0.13)
        head = [_poly((hx - s, hy - s * 0.6), (hx + s, hy - s * 0.6), (hx, hy + s * 0.9)),  # face, point down
                _poly((hx - s, hy - s * 0.6), (hx - s * 0.6, hy - s * 1.5), (hx - s * 0.2, hy - s * 0.6)),
                _poly((hx + s * 0.2, hy - s * 0.6), (hx + s * 0.6, hy - s * 1.5), (hx + s, hy - s * 0.6))]
        tail = [_tail(-bw * 0.9, 0.0, -bw - 0.10, -0.20, 0.05), _tail(-bw - 0.10, -0.20, -bw - 0.02, -0.36, 0.05)]
        return [("tail", tail)] + legs + [("body", [_ellipse(0, 0, bw, bh)]), ("head", head)]
    if name in ("car", "truck"):
        if name == "car":
            body = [_rect(-0.45, -0.05, 0.45, 0.14), _poly((-0.25, -0.05), (-0.15, -0.22), (0.18, -0.22),
                                                            (0.28, -0.05))]
            windows = [_poly((-0.19, -0.07), (-0.12, -0.19), (0.0, -0.19), (0.0, -0.07)),
                       _poly((0.04, -0.07), (0.04, -0.19), (0.16, -0.19), (0.23, -0.07))]
            wheels = (-0.28, 0.28)
        else:  # truck: a cab in front of a tall cargo box
            body = [_rect(-0.48, -0.30, 0.20, 0.12), _rect(0.20, -0.16, 0.46, 0.12)]
            windows = [_rect(0.28, -0.13, 0.42, -0.03)]
            wheels = (-0.32, -0.08, 0.33)
        r = j(0.085, 0.10)
        return ([("body", body)] + [("window", [w]) for w in windows]
                + [("wheel", [_ellipse(x, 0.14, r, r)]) for x in wheels])
    if name == "bus":  # novel: one long tall box, a row of square windows, three small wheels
        n = int(rng.integers(3, 5))
        body = [_rect(-0.50, -0.24, 0.50, 0.14)]
        xs = np.linspace(-0.40, 0.40, n + 1)
        windows = [_rect(xs[i] + 0.02, -0.19, xs[i + 1] - 0.02, -0.06) for i in range(n)]
        r = j(0.065, 0.08)
        return ([("body", body)] + [("window", [w]) for w in windows]
                + [("wheel", [_ellipse(x, 0.15, r, r)]) for x in (-0.33, 0.0, 0.33)])
    raise ValueError(f"unknown object {name!r}")


def _draw(prims: list, scale: float, ox: float, oy: float, flip: bool, size: int) -> np.ndarray:
    img = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(img)
    tx = lambda x, y: ((-x if flip else x) * scale + ox, y * scale + oy)  # noqa: E731
    for kind, args in prims:
        if kind == "poly":
            d.polygon([tx(*p) for p in args], fill=1)
        else:
            (x0, y0), (x1, y1) = tx(args[0], args[1]), tx(args[2], args[3])
            box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
            (d.ellipse if kind == "ellipse" else d.rectangle)(box, fill=1)
    return np.asarray(img, dtype=bool)


def render(name: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """(image uint8 (size, size, 3), [(part name, visible mask bool (size, size))]) of one object."""
    layout = _layout(name, rng)
    scale = size * float(rng.uniform(0.75, 1.0))
    ox, oy = size * float(rng.uniform(0.42, 0.58)), size * float(rng.uniform(0.50, 0.58))
    flip = bool(rng.random() < 0.5)
    masks = [(p, _draw(prims, scale, ox, oy, flip, size)) for p, prims in layout]
    bg = rng.uniform(0.05, 0.35, size=3)
    img = bg + rng.normal(0, 0.03, size=(size, size, 3))  # noisy, darkish background
    visible = []
    for k, (part, m) in enumerate(masks):
        occl = np.zeros_like(m)
        for _, later in masks[k + 1:]:
            occl |= later
        img[m] = rng.uniform(0.35, 1.0, size=3)  # a random colour per part: shape tells the part, not colour
        visible.append((part, m & ~occl))
    img = np.clip(img + rng.normal(0, 0.02, size=img.shape), 0, 1)
    return (img * 255).astype(np.uint8), [(p, m) for p, m in visible if m.sum() >= 4]


# ---------------------------------------------------------------- the dataset as COCO records

def sample(split: str, index: int, size: int, seed: int = 0) -> dict:
    """One image and its full annotation: {"image", "object", "masks": [(category name, mask)]}, the
    object's own mask (union of its parts) first."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], index]))
    name = list(OBJECTS)[int(rng.integers(len(OBJECTS)))]
    image, parts = render(name, rng, size)
    whole = np.zeros((size, size), dtype=bool)
    for _, m in parts:
        whole |= m
    return {"image": image, "object": name, "masks": [(name, whole)] + [(f"{name}:{p}", m) for p, m in parts]}


def to_coco(split: str, n: int, size: int, seed: int = 0, protocol: str = "auto", image_dir: str | None = None,
            image_level: float = 0.0, arrays: dict | None = None) -> dict:
    """COCO dict of `n` images. protocol "train" (auto for the train split): novel objects keep only their
    object annotation; "full" (auto for val): everything. `image_level` > 0 turns that fraction of the
    training images into image-label data (Detic's LVIS-style "pos_category_ids", no boxes). With
    `image_dir`, the PNGs are written there; with `arrays`, they are put in it by image id."""
    import os

    from pycocotools import mask as mask_utils

    protocol = ("train" if split == "train" else "full") if protocol == "auto" else protocol
    if protocol not in ("train", "full"):
        raise ValueError(f"protocol must be auto, train or full, got {protocol!r}")
    cats = categories()
    ids = {c["name"]: c["id"] for c in cats}
    images, anns = [], []
    pick = np.random.default_rng(np.random.SeedSequence([seed, 7, SPLITS[split]]))
    for i in range(n):
        s = sample(split, i, size, seed)
        info = dict(id=i + 1, file_name=f"{split}_{i:06d}.png", width=size, height=size)
        if arrays is not None:
            arrays[i + 1] = s["image"]
        if image_dir:
            os.makedirs(image_dir, exist_ok=True)
            Image.fromarray(s["image"]).save(os.path.join(image_dir, info["file_name"]))
        if protocol == "train" and image_level > 0 and pick.random() < image_level:
            info["pos_category_ids"] = [ids[s["object"]]]  # image-level label only
            images.append(info)
            continue
        images.append(info)
        for name, m in s["masks"]:
            if protocol == "train" and ":" in name and s["object"] in NOVEL:
                continue  # the cross-category protocol: no novel parts in training
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            box = [float(v) for v in mask_utils.toBbox(rle)]
            rle["counts"] = rle["counts"].decode("ascii")
            anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=ids[name], segmentation=rle,
                             area=float(m.sum()), bbox=box, iscrowd=0))
    return {"images": images, "annotations": anns, "categories": cats,
            "info": {"description": f"shapes-parts {split} (seed {seed}, protocol {protocol})"}}
