"""Video clips for the video recipes (MaskFeat on video): moving `shapes` (built in) and folders of frames.

A clip sample is {"image": (3, T, H, W) uint8, "label", "caption", "index"}; the collated batch is
(B, 3, T, H, W), normalised on the device like images.

- `MovingShapes`: sample i is scene i of the `shapes` dataset (same objects, colours, textures and
  background as image i of that split) with every object moving in a straight line at a constant speed
  (2-6% of the side per frame, random direction) and spinning (+-5 degrees per frame), bouncing off
  the borders. Deterministic by (seed, split, index), any resolution and length; frame 0 is image i.
  Labels as `shapes` (the main object's shape by default); captions describe frame 0.
- `FrameFolder`: a directory of clips, each a directory of frame images sorted by file name:
  `root/<class>/<clip>/<frame>.jpg` (labelled) or `root/<clip>/<frame>.jpg` (unlabelled); `root/train`
  and `root/val` when present (as ImageFolder). A sample takes T frames `stride` apart (SlowFast's
  16 x 4 sampling for T = 16, stride = 4): a random start in training, the centred window in
  evaluation; a clip shorter than the window repeats its last frame. An undecodable frame makes the
  sample bad (skipped and counted by the loader).

The spatial transform (crop, flip) is drawn once per clip and applied to every frame alike.
"""
from __future__ import annotations

import copy
import math
import os

import numpy as np
import torch

from train.data import shapes as shapes_mod
from train.data.folder import _is_image
from train.data.transforms import BadSample, decode_image, make_transform


class MovingShapes:
    """Map-style: `ds[i]` -> {"image": (T, H, W, 3) uint8 frames, "label", "caption", "index"}."""

    def __init__(self, split: str = "train", size: int = 100_000, frames: int = 8, resolution: int = 64,
                 label: str = "shape", seed: int = 0):
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        self.shapes = shapes_mod.Shapes(split, size, resolution, label, seed)
        self.class_names, self.frames, self.resolution = self.shapes.class_names, frames, resolution

    def __len__(self) -> int:
        return len(self.shapes)

    def _motion(self, scene: dict, index: int) -> list[tuple[float, float, float]]:
        """(vx, vy, spin) per object, from a stream independent of the scene's own."""
        sh = self.shapes
        rng = np.random.default_rng([sh.seed, shapes_mod.SPLITS[sh.split], index, 1])
        out = []
        for _ in scene["objects"]:
            speed, heading = rng.uniform(0.02, 0.06), rng.uniform(0, 2 * math.pi)
            out.append((speed * math.cos(heading), speed * math.sin(heading), rng.uniform(-5, 5)))
        return out

    @staticmethod
    def _bounce(p0: float, v: float, t: int, lo: float, hi: float) -> float:
        """Position at frame t of a point moving at v from p0, reflected at lo and hi."""
        span = hi - lo
        if span <= 0:
            return p0
        q = (p0 - lo + v * t) % (2 * span)
        return lo + (q if q <= span else 2 * span - q)

    def __getitem__(self, index: int) -> dict:
        scene, rng = self.shapes.scene(index)
        rng.random()  # Shapes.__getitem__'s caption-flip draw: frame 0 is then exactly image `index`
        state = copy.deepcopy(rng.bit_generator.state)  # every frame draws the same background
        motion = self._motion(scene, index)
        frames = []
        for t in range(self.frames):
            moved = copy.deepcopy(scene)
            for obj, (vx, vy, spin) in zip(moved["objects"], motion):
                r = shapes_mod.SIZES[shapes_mod.SIZE_NAMES[obj["size"]]] * obj["jitter"] + 0.02
                obj["xy"] = [self._bounce(obj["xy"][0], vx, t, r, 1 - r), self._bounce(obj["xy"][1], vy, t, r, 1 - r)]
                obj["angle"] += spin * t
            frame_rng = np.random.default_rng()
            frame_rng.bit_generator.state = copy.deepcopy(state)
            frames.append(shapes_mod.render(moved, self.resolution, frame_rng))
        return {"image": np.stack(frames), "label": shapes_mod.label_of(scene, self.shapes.label),
                "caption": shapes_mod.caption(scene), "index": index}


def _frames_in(directory: str) -> list[str]:
    return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                  if _is_image(f) and os.path.isfile(os.path.join(directory, f)))


class FrameFolder:
    """Map-style: `ds[i]` -> {"image": the clip's sorted frame paths, "label" (-1 unlabelled), ...}."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"frame folder root {root!r} is not a directory")
        subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        clips, labels, names = [], [], []
        if any(_frames_in(os.path.join(root, d)) for d in subdirs):  # root/<clip>/<frames>
            clips = [fr for d in subdirs if (fr := _frames_in(os.path.join(root, d)))]
            labels = [-1] * len(clips)
            self.class_names = None
        else:                                                        # root/<class>/<clip>/<frames>
            for d in subdirs:
                cdir = os.path.join(root, d)
                found = [fr for c in sorted(os.listdir(cdir)) if os.path.isdir(os.path.join(cdir, c))
                         and (fr := _frames_in(os.path.join(cdir, c)))]
                if found:
                    names.append(d)
                    clips += found
                    labels += [len(names) - 1] * len(found)
            self.class_names = names
        if not clips:
            raise FileNotFoundError(f"frame folder {root!r} holds no clips (<clip>/<frames> or "
                                    "<class>/<clip>/<frames>, frames as image files)")
        self.clips, self.labels = clips, labels

    @property
    def labelled(self) -> bool:
        return self.class_names is not None

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict:
        label = self.labels[index]
        return {"image": list(self.clips[index]), "label": label,
                "caption": self.class_names[label] if label >= 0 else "", "index": index}


def make_clip_transform(resolution: int, frames: int, stride: int, augment: str, crop_min_scale: float = 0.08):
    """(clip, rng) -> (3, frames, res, res) uint8. clip: (T, H, W, 3) uint8 frames or a list of frame
    paths (of which `frames` are taken `stride` apart). One crop / flip for the whole clip."""
    spatial = make_transform(resolution, augment, crop_min_scale)

    def transform(clip, rng: np.random.Generator) -> torch.Tensor:
        n = len(clip)
        span = (frames - 1) * stride + 1
        start = int(rng.integers(0, n - span + 1)) if augment != "none" and n > span else max((n - span) // 2, 0)
        picks = [clip[min(start + k * stride, n - 1)] for k in range(frames)]
        if picks and isinstance(picks[0], str):
            picks = [_read(p) for p in picks]
        seed = int(rng.integers(2 ** 63))  # the same crop and flip for every frame
        out = [spatial(f, np.random.default_rng(seed)) for f in picks]
        return torch.stack(out, dim=1)  # (3, T, res, res)

    return transform


def _read(path: str):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise BadSample("unreadable_file", f"{path}: {err}") from None
    return decode_image(data, path)
