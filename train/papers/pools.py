"""Data extensions the papers need and `shapes` lacks, written as WebDataset pools.

`longtail_pool` (MetaCLIP): `shapes` draws every colour uniformly and captions every image, so curation
has nothing to fix there. MetaCLIP's finding is about raw web pools: a few head concepts dominate, a long
tail is rare, and many captions name no concept at all. This pool draws the main object's colour from a
Zipf law (p_k ~ 1 / (k + 1)^2 over the 8 colours: the head colour is ~65% of the pool, the tail colour
~1%) and replaces a fraction of the captions with noise that names no colour ("img 4711", "my holiday").
Zero-shot is then scored on the balanced `shapes` held-out split, where the tail counts as much as the head.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np

NOISE = ("img {}", "photo {}", "my holiday {}", "untitled {}", "dsc {}", "screenshot {}", "wallpaper {}")


def longtail_pool(folder: str, n: int = 4000, shards: int = 4, resolution: int = 32, noise: float = 0.3,
                  seed: int = 0) -> list[str]:
    """Write the pool (once; an existing complete pool is reused); returns its shard paths."""
    import webdataset as wds
    from PIL import Image

    from train.data import shapes

    paths = [os.path.join(folder, f"{s:05d}.tar") for s in range(shards)]
    if all(os.path.isfile(p) for p in paths):
        return paths
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    p = 1.0 / (np.arange(len(shapes.COLORS)) + 1.0) ** 2
    order = rng.permutation(len(shapes.COLORS))  # which colours are the head: not always red
    per = -(-n // shards)
    for s, path in enumerate(paths):
        with wds.TarWriter(path + ".tmp") as w:  # renamed when complete: a crash leaves no half pool
            for k in range(s * per, min(n, (s + 1) * per)):
                scene = shapes.sample_scene(rng)
                scene["objects"][0]["color"] = int(order[rng.choice(len(p), p=p / p.sum())])
                image = shapes.render(scene, resolution, rng)
                text = (NOISE[int(rng.integers(len(NOISE)))].format(int(rng.integers(10_000)))
                        if rng.random() < noise else shapes.caption(scene))
                buf = io.BytesIO()
                Image.fromarray(image).save(buf, format="PNG")
                key = f"{k:07d}"
                w.write({"__key__": key, "png": buf.getvalue(), "txt": text,
                         "json": json.dumps({"id": key, "text": text}).encode()})
        os.replace(path + ".tmp", path)
    return paths


def curated_pool(folder: str, pool: list[str], t: float) -> str:
    """`kfe curate metaclip` of the pool against the colour names (MetaCLIP's metadata = the concepts)."""
    from train.curation.metaclip import curate
    from train.data import shapes

    if not os.path.isfile(os.path.join(folder, "curated.jsonl")):
        curate(list(shapes.COLOR_NAMES), pool, folder, t=t, workers=1)
    return folder
