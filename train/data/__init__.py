"""Data sources for every recipe: `shapes` (built in), ImageFolder directories, WebDataset shards.

    spec = "shapes"                          generated locally (train.data.shapes)
    spec = "/data/imagenet"                  ImageFolder; uses <dir>/train and <dir>/val when present
    spec = "/data/cc3m/{00000..00331}.tar"   WebDataset shards (image + caption), streamed
    spec = "/data/curated"                   `kfe curate metaclip` output: its kept pairs, streamed from
                                             the pool's shards (train.data.curated)

`check(spec)` validates a spec (paths exist) before anything expensive is built; `open_split` returns
a dataset for one split plus what the recipe needs to know about it (classes, size).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from train.config import opt
from train.data import shapes as shapes_mod
from train.data.folder import ImageFolder
from train.data.loader import Loader, Transformed, eval_batches  # noqa: F401  (re-exported)
from train.data.transforms import DataError, make_transform, normalize  # noqa: F401
from train.data.webdataset import WebDatasetStream, check_shards


FORMATS = "'shapes', an ImageFolder directory, or WebDataset shards like data/{00000..00099}.tar"


@dataclass
class ShapesOptions:
    size: int = opt(100_000, "shapes: train samples per epoch (images are generated, any size works)")
    val_size: int = opt(2_000, "shapes: held-out samples (an independent stream)")
    label: Literal["shape", "color", "shape_color", "position"] = opt(
        "shape", "shapes: class = main object's shape (8) | color (8) | shape_color (64) | position (9: 3 x 3 grid)")
    seed: int = opt(0, "shapes: dataset seed (changes the images, not the training order)")


@dataclass
class Split:
    dataset: object                 # map-style Transformed or a WebDatasetStream
    kind: str                       # shapes | folder | webdataset
    size: int | None                # samples (None for streams)
    class_names: list[str] | None   # None when unlabelled


def kind_of(spec: str) -> str:
    if spec == "shapes" or spec.startswith("shapes:"):
        return "shapes"
    if ".tar" in spec:
        return "webdataset"
    from train.data.curated import is_curated

    return "curated" if is_curated(spec) else "folder"


def check(spec: str, what: str = "data") -> str:
    """Raise DataError now (before any model is built) if `spec` cannot be read; return its kind."""
    if not spec:
        raise DataError(f"--{what} is empty; give {FORMATS}")
    kind = kind_of(spec)
    try:
        if kind == "webdataset":
            check_shards(spec)
        elif kind == "folder" and not os.path.isdir(spec):
            raise FileNotFoundError(f"no such directory {spec!r}")
    except FileNotFoundError as err:
        raise DataError(f"--{what} {spec!r}: {err}. Expected {FORMATS}") from None
    return kind


def _folder_split(spec: str, split: str) -> str | None:
    if split == "all":
        return spec
    sub = os.path.join(spec, split)
    if os.path.isdir(os.path.join(spec, "train")):  # ImageNet layout: <root>/train, <root>/val
        return sub if os.path.isdir(sub) else None
    return spec if split == "train" else None


def open_split(spec: str, split: str, *, resolution: int, fields: tuple[str, ...], augment: str,
               seed: int, rank: int = 0, world: int = 1, shapes: ShapesOptions | None = None,
               crop_min_scale: float = 0.08, crop_pct: float = 0.875, randaug: str = "") -> Split | None:
    """The `split` ("train" | "val" | "all" for a folder) of a data spec, transformed; None when the spec
    has no such split (an ImageFolder without val/; WebDataset shards, whose held-out shards are their
    own spec: see open_eval). A WebDataset train split is an endless stream."""
    kind = check(spec)
    transform = make_transform(resolution, augment, crop_min_scale, crop_pct, randaug=randaug)
    if kind == "shapes":
        opts = shapes or ShapesOptions()
        base = shapes_mod.Shapes(split, opts.size if split == "train" else opts.val_size, resolution,
                                 opts.label, opts.seed)
        return Split(Transformed(base, transform, seed), kind, len(base), base.class_names)
    if kind == "folder":
        root = _folder_split(spec, split)
        if root is None:
            return None
        try:
            base = ImageFolder(root)
        except FileNotFoundError as err:
            raise DataError(str(err)) from None
        if "label" in fields and not base.labelled:
            raise DataError(f"{root!r} is an unlabelled ImageFolder (images at its top level); this recipe "
                            "needs labels: use <root>/<class>/<image>")
        return Split(Transformed(base, transform, seed), kind, len(base), base.class_names)
    if split != "train":
        return None  # held-out shards are given as their own spec (val_data)
    if kind == "curated":  # a stream of the kept pairs; one epoch = one pass over them
        from train.data.curated import open_curated

        stream = open_curated(spec, fields, transform, rank, world, seed)
        return Split(stream, "webdataset", stream.size, None)
    stream = WebDatasetStream(check_shards(spec), fields, transform, rank, world, seed, loop=True)
    return Split(stream, kind, None, None)


def open_eval(spec: str, *, resolution: int, fields: tuple[str, ...], seed: int, rank: int = 0,
              world: int = 1, shapes: ShapesOptions | None = None, split: str = "val",
              whole: bool = False, crop_pct: float = 0.875) -> Split | None:
    """A split with the eval transform (resize the shorter side to resolution / crop_pct + centre crop): `split` of `spec` ("val", or "train" for
    probe features), or with whole=True (an explicit --val_data) all of an ImageFolder. WebDataset
    specs are read whole, once, split across ranks."""
    if kind_of(spec) == "webdataset":
        check(spec)
        stream = WebDatasetStream(check_shards(spec), fields, make_transform(resolution, "none", crop_pct=crop_pct),
                                  rank, world,
                                  seed, loop=False)
        return Split(stream, "webdataset", None, None)
    if kind_of(spec) == "curated":
        return None  # training pairs only: give --val_data for a held-out split
    if whole and kind_of(spec) == "folder":
        split = "all"
    return open_split(spec, split, resolution=resolution, fields=fields, augment="none", seed=seed, rank=rank,
                      world=world, shapes=shapes, crop_pct=crop_pct)
