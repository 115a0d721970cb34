"""Pre-computed latents (e.g. Stable Diffusion VAE encodings, as DiT trains on) from array shards.

    spec = "latents/"                          every shard in the directory, sorted by name
    spec = "latents/{00000..00015}.npy"        a brace pattern (or a glob, or one file)

A shard holds (N, C, H, W) latents and, optionally, (N,) integer class labels:
  - `name.npy`: the latents; labels in `name.labels.npy` next to it (memory-mapped, never read whole);
  - `name.npz`: arrays `latents` and `labels`;
  - `name.pt` / `name.pth`: torch.save of {"latents": tensor, "labels": tensor} or of the latents alone
    (loaded with mmap).
A shard may record its `latent_scale` (the .npz array / .pt key of that name; `kfe latents encode`
writes the VAE's scaling_factor, 0.18215 for SD-VAE): shards that record one must agree, and `kfe train
dit` multiplies the latents by it unless --latent_scale is given.
Either every shard has labels or none does (then every label is 0: one class, unconditional). Shards
must agree on (C, H, W), with H == W. Samples come out as {"image": float32 (C, H, W), "label": int},
so the shared loader, sampler and resume logic apply unchanged (image batches that are floating point
are moved to the device as they are, not normalised).
"""
from __future__ import annotations

import bisect
import glob
import os
import pickle
import re

import numpy as np
import torch

from train.data.loader import Transformed

EXTS = (".npy", ".npz", ".pt", ".pth")
LABELS_SUFFIX = ".labels.npy"


class LatentError(ValueError):
    """A latent shard spec or file that cannot be used (the message names the file)."""


def _is_shard(path: str) -> bool:
    return path.endswith(EXTS) and not path.endswith(LABELS_SUFFIX)


def expand(spec: str) -> list[str]:
    """Shard paths of a spec (directory, brace pattern, glob or file); [] when it names no shard."""
    if os.path.isdir(spec):
        return sorted(os.path.join(spec, f) for f in os.listdir(spec) if _is_shard(f))
    from braceexpand import braceexpand

    paths = []
    for part in braceexpand(spec):
        paths += sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
    return paths if paths and all(_is_shard(p) for p in paths) else []


def is_latent_spec(spec: str) -> bool:
    """True for a spec naming array shards by extension (existing or not: open_latents then says what is
    missing), or a directory holding any."""
    return bool(spec) and spec != "shapes" and (spec.endswith(EXTS) or (os.path.isdir(spec) and bool(expand(spec))))


def _load(path: str) -> tuple[object, object | None, float | None]:
    if not os.path.isfile(path):
        raise LatentError(f"latent shard {path!r} does not exist")
    try:
        if path.endswith(".npy"):
            lab = path[:-4] + LABELS_SUFFIX
            return np.load(path, mmap_mode="r"), (np.load(lab, mmap_mode="r") if os.path.exists(lab) else None), None
        if path.endswith(".npz"):
            z = np.load(path)
            if "latents" not in z:
                raise LatentError(f"{path}: an .npz shard needs an array named 'latents' (has {list(z.keys())})")
            scale = float(z["latent_scale"]) if "latent_scale" in z else None
            return z["latents"], (z["labels"] if "labels" in z else None), scale
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused an object: one line naming it
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        raise LatentError(f"cannot read latent shard {path}: it references {found.group(1) if found else 'objects'}, "
                          "not only tensors and plain data") from None
    except (OSError, ValueError, RuntimeError) as err:
        if isinstance(err, LatentError):
            raise
        raise LatentError(f"cannot read latent shard {path}: {err}") from None
    if isinstance(obj, torch.Tensor):
        return obj, None, None
    if isinstance(obj, dict) and "latents" in obj:
        scale = obj.get("latent_scale")
        return obj["latents"], obj.get("labels"), None if scale is None else float(scale)
    raise LatentError(f"{path}: a .pt shard must hold a tensor or a dict with 'latents' (and 'labels')")


class LatentShards:
    """Map-style dataset over the concatenation of the shards: index -> {"image", "label"}."""

    def __init__(self, paths: list[str]):
        if not paths:
            raise LatentError("no latent shards given")
        self.paths, self.latents, self.labels, self.ends = paths, [], [], []
        total, shape, scales = 0, None, {}
        for path in paths:
            lat, lab, scale = _load(path)
            if scale is not None:
                scales.setdefault(scale, path)
            if lat.ndim != 4:
                raise LatentError(f"{path}: latents must be (N, C, H, W), got shape {tuple(lat.shape)}")
            if shape is None:
                shape = tuple(lat.shape[1:])
                if shape[1] != shape[2]:
                    raise LatentError(f"{path}: latents must be square (H == W), got (C, H, W) = {shape}")
            elif tuple(lat.shape[1:]) != shape:
                raise LatentError(f"{path}: (C, H, W) = {tuple(lat.shape[1:])} differs from {shape} of {paths[0]}")
            if lab is not None:
                lab = np.asarray(lab)
                if lab.shape != (lat.shape[0],) or not np.issubdtype(lab.dtype, np.integer) or (lab < 0).any():
                    raise LatentError(f"{path}: labels must be ({lat.shape[0]},) non-negative integers, got "
                                      f"shape {lab.shape} dtype {lab.dtype}")
            self.latents.append(lat)
            self.labels.append(lab)
            total += lat.shape[0]
            self.ends.append(total)
        have = [lab is not None for lab in self.labels]
        if any(have) and not all(have):
            missing = [p for p, h in zip(paths, have) if not h][:3]
            raise LatentError(f"some latent shards have labels and some do not (without: {', '.join(missing)})")
        if len(scales) > 1:
            raise LatentError(f"latent shards record different latent_scale values {sorted(scales)} (e.g. "
                              f"{', '.join(scales.values())}): encoded by different VAEs?")
        self.latent_scale = next(iter(scales), None)  # None: no shard records one
        self.labelled = all(have)
        self.sample_shape = shape  # (C, H, W)
        self.num_classes = int(max(int(lab.max()) for lab in self.labels if len(lab)) + 1) if self.labelled else 1

    def __len__(self) -> int:
        return self.ends[-1]

    def __getitem__(self, index: int) -> dict:
        s = bisect.bisect_right(self.ends, index)
        j = index - (self.ends[s - 1] if s else 0)
        lat = self.latents[s][j]
        image = lat.float().clone() if isinstance(lat, torch.Tensor) else torch.from_numpy(np.array(lat, np.float32))
        return {"image": image, "label": int(self.labels[s][j]) if self.labelled else 0}


def as_is(sample, rng):
    """The identity transform (latents are not augmented here: encode flipped images to get flips)."""
    return sample


def open_latents(spec: str, seed: int) -> tuple[Transformed, LatentShards]:
    paths = expand(spec)
    if not paths:
        raise LatentError(f"{spec!r} names no latent shards ({', '.join(EXTS)})")
    base = LatentShards(paths)
    return Transformed(base, as_is, seed), base
