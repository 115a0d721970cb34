"""COCO-format part data (PartImageNet, Pascal Part, PACO are distributed this way) read with pycocotools,
and the built-in `shapes-parts` (train/data/shapes_parts.py) in the same form.

`PartDataset` holds one split: images (files under an image root, or arrays in memory), and per image
its annotations (category, box, mask as polygons or RLE) or its image-level labels (Detic's LVIS-style
"pos_category_ids"). Bad annotations are skipped and counted in `skipped`, never crashed on: empty or
degenerate segmentations, boxes outside the image (or of no area), unknown category ids. Extra
annotation files (parsed parts from `kfe vlpart parse`) are merged by image id.

Every image is resized to resolution x resolution (boxes and masks scaled with it); item i is
{"image": uint8 (res, res, 3), "index": i}, and `targets(i)` the model's training target of image i
(labels are vocabulary index + 1).
"""
from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from train.data import shapes_parts as sp

SHAPES_PARTS = "shapes-parts"


def _decode(seg, h: int, w: int) -> np.ndarray | None:
    """A COCO segmentation (polygon list, RLE dict with str/bytes or list counts) -> bool (h, w) mask."""
    if isinstance(seg, list):
        polys = [p for p in seg if isinstance(p, (list, tuple)) and len(p) >= 6]
        if not polys:
            return None
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    elif isinstance(seg, dict) and "counts" in seg:
        rle = dict(seg)
        if isinstance(rle["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(rle, h, w)
        elif isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        return None
    m = mask_utils.decode(rle).astype(bool)
    return m if m.shape == (h, w) else None


class PartDataset:
    def __init__(self, coco: dict, resolution: int, image_root: str = "", arrays: dict | None = None,
                 extra: list[dict] | None = None):
        self.resolution, self.image_root, self.arrays = resolution, image_root, arrays or {}
        self.categories = sorted(coco["categories"], key=lambda c: c["id"])
        self.names = [c["name"] for c in self.categories]
        self.cat_index = {c["id"]: i for i, c in enumerate(self.categories)}
        self.images = list(coco["images"])
        self.skipped: Counter = Counter()
        by_image: dict[int, list] = {im["id"]: [] for im in self.images}
        for doc in [coco] + list(extra or []):
            for a in doc.get("annotations", []):
                if a.get("image_id") not in by_image:
                    self.skipped["unknown image id"] += 1
                    continue
                by_image[a["image_id"]].append(a)
        self.records = []
        for im in self.images:
            self.records.append(self._clean(im, by_image[im["id"]]))

    def _clean(self, im: dict, anns: list[dict]) -> dict:
        h, w = im["height"], im["width"]
        keep = []
        for a in anns:
            if a.get("iscrowd", 0):
                self.skipped["crowd"] += 1
                continue
            if a.get("category_id") not in self.cat_index:
                self.skipped["unknown category id"] += 1
                continue
            x, y, bw, bh = (a.get("bbox") or [0, 0, 0, 0])[:4]
            if bw <= 0 or bh <= 0 or x >= w or y >= h or x + bw <= 0 or y + bh <= 0:
                self.skipped["box outside the image or empty"] += 1
                continue
            if x < -1 or y < -1 or x + bw > w + 1 or y + bh > h + 1:
                self.skipped["box outside the image or empty"] += 1
                continue
            seg = a.get("segmentation")
            if not seg or (isinstance(seg, list) and not any(len(p) >= 6 for p in seg)):
                self.skipped["empty segmentation"] += 1
                continue
            keep.append(a)
        labels = [self.cat_index[c] for c in im.get("pos_category_ids", []) if c in self.cat_index]
        return {"anns": keep, "image_labels": labels if not keep else []}

    def __len__(self) -> int:
        return len(self.images)

    def load_image(self, i: int) -> np.ndarray:
        im = self.images[i]
        if im["id"] in self.arrays:
            arr = self.arrays[im["id"]]
        else:
            with Image.open(os.path.join(self.image_root, im["file_name"])) as f:
                arr = np.asarray(f.convert("RGB"))
        r = self.resolution
        if arr.shape[:2] != (r, r):
            arr = np.asarray(Image.fromarray(arr).resize((r, r), Image.BILINEAR))
        return arr

    def __getitem__(self, i: int) -> dict:
        return {"image": self.load_image(i), "index": i}

    def masks(self, i: int) -> tuple[list[int], np.ndarray]:
        """(vocabulary indices, bool masks (K, res, res)) of image i's annotations."""
        im, rec, r = self.images[i], self.records[i], self.resolution
        cats, out = [], []
        for a in rec["anns"]:
            m = _decode(a["segmentation"], im["height"], im["width"])
            if m is None or not m.any():
                continue  # counted at load time only when visibly empty; a degenerate polygon decodes empty
            if m.shape != (r, r):
                m = np.asarray(Image.fromarray(m).resize((r, r), Image.NEAREST))
                if not m.any():
                    continue
            cats.append(self.cat_index[a["category_id"]])
            out.append(m)
        return cats, (np.stack(out) if out else np.zeros((0, r, r), dtype=bool))

    def targets(self, i: int) -> dict:
        rec = self.records[i]
        if rec["image_labels"]:
            return {"image_labels": list(rec["image_labels"])}
        cats, masks = self.masks(i)
        boxes = [_box(m) for m in masks]
        return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(cats, dtype=torch.long) + 1,
                "masks": torch.from_numpy(masks.astype(np.uint8))}


def _box(m: np.ndarray) -> list[float]:
    ys, xs = np.where(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def shapes_parts_coco(split: str, n: int, resolution: int, seed: int, image_level: float = 0.0):
    """(COCO dict, {image id: array}) of the built-in data, drawn in memory."""
    arrays: dict = {}
    coco = sp.to_coco(split, n, resolution, seed, image_level=image_level, arrays=arrays)
    return coco, arrays


def load_coco(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such annotation file {path!r}")
    with open(path) as f:
        coco = json.load(f)
    for key in ("images", "categories"):
        if not isinstance(coco.get(key), list):
            raise ValueError(f"{path}: not COCO JSON (no {key!r} list)")
    return coco


def open_parts(spec: str, split: str, resolution: int, *, seed: int = 0, size: int = 0, image_root: str = "",
               extra: list[str] = (), image_level: float = 0.0) -> PartDataset:
    """`spec` "shapes-parts" (split train | val, `size` images) or a COCO JSON file (images under
    `image_root`, default: the JSON's folder, or its images/ subfolder when that exists)."""
    extras = [load_coco(p) for p in extra]
    if spec == SHAPES_PARTS:
        coco, arrays = shapes_parts_coco(split, size, resolution, seed, image_level)
        return PartDataset(coco, resolution, arrays=arrays, extra=extras)
    coco = load_coco(spec)
    if not image_root:
        here = os.path.dirname(os.path.abspath(spec))
        image_root = os.path.join(here, "images") if os.path.isdir(os.path.join(here, "images")) else here
    return PartDataset(coco, resolution, image_root=image_root, extra=extras)
