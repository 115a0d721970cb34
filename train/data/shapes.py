"""`shapes`: a built-in image dataset drawn on the fly, deterministic by (seed, split, index).

Each image holds one or two objects on a dark, slightly noisy background. An object has a shape
(8), a colour (8), a size (small / medium / large), a texture (solid / striped / dotted / checkered),
a position and a small rotation. With two objects, the *main* object is strictly larger than the
other one and drawn on top, so it is always identifiable; the pair is related by a spatial word
(above / below / left of / right of), which is also how the second object is placed.

Labels (`label=`): "shape" (default, 8 classes: the main object's shape), "color" (8),
"shape_color" (64: shape x colour of the main object) or "position" (9: the cell of a 3 x 3 grid that
holds the main object's centre, "at the top left" .. "at the bottom right", as single-object captions
say; only features that keep *where* things are predict it: added for long-sequence MAE's ablation, which
the paper evaluates on localisation). Captions describe every object, e.g. "a large striped red triangle
above a small blue circle" (texture omitted when solid).

Splits: sample i of split s is drawn from numpy's SeedSequence([seed, s, i]); the train split is
s = 0 and the held-out split s = 1, so the two are independent streams (no stored files, any size,
any resolution). Shapes are signed-distance functions evaluated only inside each object's bounding
box (vectorised numpy), anti-aliased over one pixel.
"""
from __future__ import annotations

import functools
import math

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross", "ring")
COLORS = {  # RGB in [0, 1], saturated so colour survives the texture's darker shade
    "red": (0.90, 0.12, 0.12), "orange": (0.98, 0.55, 0.08), "yellow": (0.95, 0.90, 0.15),
    "green": (0.15, 0.75, 0.20), "cyan": (0.10, 0.85, 0.90), "blue": (0.15, 0.30, 0.95),
    "purple": (0.60, 0.20, 0.85), "white": (0.95, 0.95, 0.95),
}
COLOR_NAMES = tuple(COLORS)
SIZES = {"small": 0.10, "medium": 0.16, "large": 0.24}  # circumradius / image side
SIZE_NAMES = tuple(SIZES)
TEXTURES = ("solid", "striped", "dotted", "checkered")
RELATIONS = {"above": (0, -1), "below": (0, 1), "left of": (-1, 0), "right of": (1, 0)}
INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
LABELS = ("shape", "color", "shape_color", "position")
ROWS, COLS = ("top", "", "bottom"), ("left", "", "right")  # the 3 x 3 grid: cuts at 0.38 and 0.62 of the side
SPLITS = {"train": 0, "val": 1}
_RGB = np.array(list(COLORS.values()), dtype=np.float32)


def class_names(label: str = "shape") -> list[str]:
    if label == "shape":
        return list(SHAPES)
    if label == "color":
        return list(COLOR_NAMES)
    if label == "shape_color":
        return [f"{c} {s}" for s in SHAPES for c in COLOR_NAMES]
    if label == "position":
        return list(POSITIONS)
    raise ValueError(f"label must be one of {LABELS}, got {label!r}")


# ---------------------------------------------------------------- signed distances (pixels, >0 inside)

def _polygon(u, v, r, n, phase):
    apothem = r * math.cos(math.pi / n)
    d = np.full_like(u, -np.inf)
    for k in range(n):
        a = phase + 2 * math.pi * k / n
        d = np.maximum(d, u * math.cos(a) + v * math.sin(a))
    return apothem - d


def _sdf(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return r - np.hypot(u, v)
    if shape == "ring":
        d = np.hypot(u, v)
        return np.minimum(r - d, d - 0.55 * r)
    if shape == "square":
        return 0.8 * r - np.maximum(np.abs(u), np.abs(v))
    if shape == "diamond":  # a square on its corner (rotations stay within +-15 degrees)
        return (r - (np.abs(u) + np.abs(v))) / math.sqrt(2)
    if shape == "triangle":  # pointing up: one edge normal points down (+v)
        return _polygon(u, v + 0.2 * r, 1.25 * r, 3, math.pi / 2)
    if shape == "hexagon":
        return _polygon(u, v, r, 6, 0.0)
    if shape == "cross":
        w = 0.33 * r
        arm_h = np.minimum(r - np.abs(u), w - np.abs(v))
        arm_v = np.minimum(w - np.abs(u), r - np.abs(v))
        return np.maximum(arm_h, arm_v)
    if shape == "star":  # 5 points; radius interpolates between inner and outer along the angle
        d = np.hypot(u, v)
        t = (np.arctan2(v, u) + math.pi / 2) * 5 / (2 * math.pi)
        tri = np.abs(t - np.round(t)) * 2  # 0 at a point, 1 between points
        boundary = r * (1.0 - 0.58 * tri)
        return (boundary - d) * 0.6
    raise ValueError(f"unknown shape {shape!r}")


def _texture(kind: str, u: np.ndarray, v: np.ndarray, period: float, angle: float) -> np.ndarray:
    """1 where the darker shade shows, 0 where the plain colour shows."""
    if kind == "solid":
        return np.zeros_like(u)
    if kind == "striped":
        t = (u * math.cos(angle) + v * math.sin(angle)) / period
        return ((t - np.floor(t)) < 0.5).astype(np.float32)
    if kind == "dotted":
        fu, fv = u / period, v / period
        du, dv = fu - np.floor(fu) - 0.5, fv - np.floor(fv) - 0.5
        return ((du * du + dv * dv) < 0.09).astype(np.float32)
    if kind == "checkered":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    raise ValueError(f"unknown texture {kind!r}")


# ---------------------------------------------------------------- scene sampling

def _object(rng: np.random.Generator, size: int) -> dict:
    shape = int(rng.integers(len(SHAPES)))
    return {"shape": shape, "color": int(rng.integers(len(COLORS))), "size": size,
            "texture": int(rng.integers(len(TEXTURES))),
            "angle": float(rng.uniform(-15, 15)),
            "jitter": float(rng.uniform(0.9, 1.1)), "stripe_angle": float(rng.uniform(0, math.pi))}


def sample_scene(rng: np.random.Generator) -> dict:
    """Attributes and relative positions (in [0, 1]) of one image's objects; objects[0] is the main one."""
    two = rng.random() < 0.5
    if not two:
        main = _object(rng, int(rng.integers(len(SIZES))))
        r = SIZES[SIZE_NAMES[main["size"]]] * main["jitter"]
        main["xy"] = rng.uniform(r + 0.04, 1 - r - 0.04, size=2).tolist()
        return {"objects": [main], "relation": None}
    main_size = int(rng.integers(1, len(SIZES)))  # medium or large ...
    main = _object(rng, main_size)
    other = _object(rng, int(rng.integers(main_size)))  # ... and the other strictly smaller
    relation = list(RELATIONS)[int(rng.integers(len(RELATIONS)))]
    dx, dy = RELATIONS[relation]  # where `main` sits relative to `other`
    r_main = SIZES[SIZE_NAMES[main_size]] * main["jitter"]
    r_other = SIZES[SIZE_NAMES[other["size"]]] * other["jitter"]
    m, gap = 0.02, 0.02  # margin to the border, gap between the objects
    axis, main_first = (0, dx < 0) if dx else (1, dy < 0)
    r_first, r_second = (r_main, r_other) if main_first else (r_other, r_main)
    slack = max(1 - 2 * m - 2 * (r_first + r_second) - gap, 0.0)
    a = rng.uniform(0, slack)
    b = rng.uniform(0, slack - a)
    p_first = m + r_first + a
    p_second = p_first + r_first + r_second + gap + b
    main_xy, other_xy = [0.0, 0.0], [0.0, 0.0]
    main_xy[axis], other_xy[axis] = (p_first, p_second) if main_first else (p_second, p_first)
    across = 1 - axis
    main_xy[across] = float(rng.uniform(m + r_main, 1 - m - r_main))
    other_xy[across] = float(np.clip(main_xy[across] + rng.uniform(-0.1, 0.1), m + r_other, 1 - m - r_other))
    main["xy"], other["xy"] = main_xy, other_xy
    return {"objects": [main, other], "relation": relation}


def _phrase(obj: dict) -> str:
    words = [SIZE_NAMES[obj["size"]]]
    if TEXTURES[obj["texture"]] != "solid":
        words.append(TEXTURES[obj["texture"]])
    words += [COLOR_NAMES[obj["color"]], SHAPES[obj["shape"]]]
    return "a " + " ".join(words)


def _cell(xy) -> tuple[int, int]:
    """(row, column) of a position in [0, 1]^2 on the 3 x 3 grid (0 = top / left, 2 = bottom / right)."""
    x, y = xy
    return (0 if y < 0.38 else 2 if y > 0.62 else 1), (0 if x < 0.38 else 2 if x > 0.62 else 1)


def _where(xy) -> str:
    r, c = _cell(xy)
    row, col = ROWS[r], COLS[c]
    if row and col:
        return f"at the {row} {col}"
    if row:
        return f"at the {row}"
    return f"on the {col}" if col else "in the center"


# the "position" label's class names, row-major: the phrases single-object captions end with
POSITIONS = tuple(_where(((c + 0.5) / 3, (r + 0.5) / 3)) for r in range(3) for c in range(3))


def caption(scene: dict, flip: bool = False) -> str:
    """'a large striped red triangle above a small blue circle' (flip: name the other object first)."""
    objs = scene["objects"]
    if len(objs) == 1:
        return f"{_phrase(objs[0])} {_where(objs[0]['xy'])}"
    rel = scene["relation"]
    if flip:
        return f"{_phrase(objs[1])} {INVERSE[rel]} {_phrase(objs[0])}"
    return f"{_phrase(objs[0])} {rel} {_phrase(objs[1])}"


def label_of(scene: dict, label: str = "shape") -> int:
    main = scene["objects"][0]
    if label == "shape":
        return main["shape"]
    if label == "color":
        return main["color"]
    if label == "shape_color":
        return main["shape"] * len(COLORS) + main["color"]
    if label == "position":
        row, col = _cell(main["xy"])
        return 3 * row + col
    raise ValueError(f"label must be one of {LABELS}, got {label!r}")


# ---------------------------------------------------------------- rendering

def render(scene: dict, res: int, rng: np.random.Generator) -> np.ndarray:
    """(res, res, 3) uint8 image of a scene; objects drawn back to front (the main one last)."""
    base = (rng.uniform(0.0, 0.3) + rng.uniform(-0.05, 0.05, size=3)).astype(np.float32)
    oy, ox = rng.integers(res, size=2)
    img = np.add(_noise(res)[oy:oy + res, ox:ox + res], base)  # a random window of a fixed noise field
    for obj in reversed(scene["objects"]):
        _draw(img, obj, res)
    np.clip(img, 0.0, 1.0, out=img)  # in place: at 224 px these full-image passes dominate
    img *= 255.0
    img += 0.5
    return img.astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _noise(res: int) -> np.ndarray:
    """(2 res, 2 res, 1) Gaussian noise, sigma 0.03, fixed per resolution (cheap per-image background)."""
    return np.random.default_rng(12345).normal(0, 0.03, size=(2 * res, 2 * res, 1)).astype(np.float32)


def _draw(img: np.ndarray, obj: dict, res: int) -> None:
    r = SIZES[SIZE_NAMES[obj["size"]]] * obj["jitter"] * res
    cx, cy = obj["xy"][0] * res, obj["xy"][1] * res
    x0, x1 = max(int(cx - 1.3 * r) - 1, 0), min(int(cx + 1.3 * r) + 2, res)
    y0, y1 = max(int(cy - 1.3 * r) - 1, 0), min(int(cy + 1.3 * r) + 2, res)
    xs = np.arange(x0, x1, dtype=np.float32) + 0.5 - cx
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
    a = math.radians(obj["angle"])
    ca, sa = math.cos(a), math.sin(a)
    u, v = ca * xs + sa * ys, -sa * xs + ca * ys  # rotated local frame, (h, w) each
    alpha = np.clip(_sdf(SHAPES[obj["shape"]], u, v, r) + 0.5, 0.0, 1.0)[..., None]
    period = max(2.0, r / 2.5)
    shade = _texture(TEXTURES[obj["texture"]], u, v, period, obj["stripe_angle"])[..., None]
    rgb = _RGB[obj["color"]]
    fill = rgb * (1 - 0.55 * shade)  # the texture is a darker shade of the same colour
    patch = img[y0:y1, x0:x1]
    patch += alpha * (fill - patch)


class Shapes:
    """Map-style dataset of generated images: `ds[i]` -> {"image": (H, W, 3) uint8, "label", "caption"}.

    Args:
        split: "train" or "val" (independent streams, see the module docstring).
        size: number of samples (the epoch length); any index below it is valid.
        resolution: image side in pixels (any value >= 16).
        label: "shape" | "color" | "shape_color" | "position".
        seed: the dataset seed (not the training seed: changing it changes the images).
    """

    def __init__(self, split: str = "train", size: int = 100_000, resolution: int = 64, label: str = "shape",
                 seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        if resolution < 16:
            raise ValueError(f"resolution must be >= 16 pixels, got {resolution}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.class_names = class_names(label)
        self.split, self.size, self.resolution, self.label, self.seed = split, size, resolution, label, seed

    def __len__(self) -> int:
        return self.size

    def scene(self, index: int) -> tuple[dict, np.random.Generator]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        return sample_scene(rng), rng

    def caption(self, index: int) -> str:
        """Sample `index`'s caption without drawing the image (what __getitem__ gives; cheap)."""
        scene, rng = self.scene(index)
        return caption(scene, bool(rng.random() < 0.5))

    def __getitem__(self, index: int) -> dict:
        scene, rng = self.scene(index)
        flip = bool(rng.random() < 0.5)
        return {"image": render(scene, self.resolution, rng), "label": label_of(scene, self.label),
                "caption": caption(scene, flip), "index": index}
