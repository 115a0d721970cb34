"""Data extensions the papers need and `shapes` lacks, written as WebDataset pools.

`longtail_pool` (MetaCLIP): `shapes` draws every colour uniformly and captions every image, so curation
has nothing to fix there. MetaCLIP's finding is about raw web pools: a few head concepts dominate, a long
tail is rare, and many captions name no concept at all. This pool draws every object's colour from a
Zipf law (p_k ~ 1 / (k + 1)^2 over the 8 colours: the head colour is ~65% of the pool, the tail colour
~1%) and replaces a fraction of the captions with noise that names no colour ("img 4711", "my holiday").
Zero-shot is then scored on the balanced `shapes` held-out split, where the tail counts as much as the head.

`offtopic_pool` (CiT): every `shapes` caption names the colours the zero-shot evaluation asks for, so a
CLIP trained on `shapes` spends every step on-topic and curation has nothing to select. CiT's finding
is about pools where most pairs say nothing about the evaluation's classes: here only 20% of the
captions name a colour (full `shapes` captions); 40% describe the same kind of scene with the colour
words dropped ("a large striped triangle above a small circle": on-topic images, off-topic text) and
40% are noise captions. Raw CLIP learns colour from a fifth of its batch; CiT can select that fifth.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np

NOISE = ("img {}", "photo {}", "my holiday {}", "untitled {}", "dsc {}", "screenshot {}", "wallpaper {}")


def _write_pool(folder: str, n: int, shards: int, seed: int, resolution: int, draw) -> list[str]:
    """Write n pairs from draw(rng, resolution) -> (image, caption) into `shards` WebDataset shards
    (once; an existing complete pool is reused); returns the shard paths."""
    import webdataset as wds
    from PIL import Image

    paths = [os.path.join(folder, f"{s:05d}.tar") for s in range(shards)]
    if all(os.path.isfile(p) for p in paths):
        return paths
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    per = -(-n // shards)
    for s, path in enumerate(paths):
        with wds.TarWriter(path + ".tmp") as w:  # renamed when complete: a crash leaves no half pool
            for k in range(s * per, min(n, (s + 1) * per)):
                image, text = draw(rng, resolution)
                buf = io.BytesIO()
                Image.fromarray(image).save(buf, format="PNG")
                key = f"{k:07d}"
                w.write({"__key__": key, "png": buf.getvalue(), "txt": text,
                         "json": json.dumps({"id": key, "text": text}).encode()})
        os.replace(path + ".tmp", path)
    return paths


def longtail_order(seed: int = 0) -> list[int]:
    """The pool's colours (indices into shapes.COLOR_NAMES), most frequent first: not always red."""
    from train.data import shapes

    return [int(c) for c in np.random.default_rng(seed).permutation(len(shapes.COLORS))]


def longtail_pool(folder: str, n: int = 4000, shards: int = 4, resolution: int = 32, noise: float = 0.3,
                  seed: int = 0) -> list[str]:
    """The MetaCLIP pool (module doc): Zipf colour counts, a `noise` fraction of captions naming nothing."""
    from train.data import shapes

    p = 1.0 / (np.arange(len(shapes.COLORS)) + 1.0) ** 2
    order = longtail_order(seed)

    def draw(rng, res):
        scene = shapes.sample_scene(rng)
        for obj in scene["objects"]:  # both objects: the head colour dominates every mention, as on the web
            obj["color"] = int(order[rng.choice(len(p), p=p / p.sum())])
        image = shapes.render(scene, res, rng)
        text = (NOISE[int(rng.integers(len(NOISE)))].format(int(rng.integers(10_000)))
                if rng.random() < noise else shapes.caption(scene))
        return image, text
    return _write_pool(folder, n, shards, seed, resolution, draw)


def colourless(caption: str) -> str:
    """A `shapes` caption with its colour words dropped: 'a large striped triangle above a small circle'."""
    from train.data import shapes

    return " ".join(w for w in caption.split() if w not in shapes.COLOR_NAMES)


def offtopic_pool(folder: str, n: int = 12000, shards: int = 4, resolution: int = 32, on_topic: float = 0.2,
                  seed: int = 1) -> list[str]:
    """The CiT pool (module doc): only an `on_topic` fraction of captions names a colour (the evaluation's
    classes); the rest describe shape, size, texture and position, or are noise, and name no colour."""
    from train.data import shapes

    def draw(rng, res):
        scene = shapes.sample_scene(rng)
        image = shapes.render(scene, res, rng)
        u = rng.random()
        if u < on_topic:
            text = shapes.caption(scene)
        elif u < on_topic + (1 - on_topic) / 2:
            text = colourless(shapes.caption(scene))
        else:
            text = NOISE[int(rng.integers(len(NOISE)))].format(int(rng.integers(10_000)))
        return image, text
    return _write_pool(folder, n, shards, seed, resolution, draw)


def curated_pool(folder: str, pool: list[str], t: float) -> str:
    """`kfe curate metaclip` of the pool against the colour names (MetaCLIP's metadata = the concepts)."""
    from train.curation.metaclip import curate
    from train.data import shapes

    if not os.path.isfile(os.path.join(folder, "curated.jsonl")):
        curate(list(shapes.COLOR_NAMES), pool, folder, t=t, workers=1)
    return folder
