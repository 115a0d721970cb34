"""`kfe vlpart parse`: novel objects parsed into parts by dense correspondence with base objects (VLPart, Sec. 3.3).

For every novel-object instance of the training data (object mask + name, no parts):
1. the nearest base-object instance (one with part annotations) by the cosine similarity of their global
   features (the backbone's features averaged inside each object's mask);
2. every pixel inside the novel object's mask takes the part of its nearest-neighbour pixel inside the
   base object's mask: cosine similarity of per-pixel features minus `coord_weight` x the squared
   distance of the two pixels' positions in their objects' boxes (scaled to [0, 1]), the base also tried
   mirrored (objects face either way; the better mean match wins). The position term is the geometric
   regulariser of dense correspondence: features alone match a leg pixel to *some* leg pixel, the
   position picks the one in the same place, and it keeps isolated wrong matches from becoming parts.
   With `neighbours` > 1 the k nearest base objects vote per pixel. Base pixels outside every part are
   "no part";
3. the pixels of each part become its transferred mask: the largest connected component (the k largest
   when the base object has k instances of that part, e.g. four legs), box from the mask;
4. the parsed parts are written as COCO JSON annotations of the novel object's part categories
   ("cat:head" from "dog:head"), which training reads like any other part data (--parsed FILE).

Features: "backbone" = a trained VLPart run's own backbone (FPN P2, stride 4, upsampled to pixels): it has
learned what a head, a leg or a wheel looks like on base objects, whatever their colour. "pixels" = raw
RGB, the baseline (on shapes-parts, where parts have random colours, it cannot know a part).
"""
from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from scipy import ndimage


def instances(ds) -> tuple[list[dict], list[dict]]:
    """(base, novel) object instances of a PartDataset: {"image", "object" (vocab idx), "mask",
    "parts": [(part name, mask)]}. A part belongs to the object whose mask covers most of it."""
    base, novel = [], []
    names = ds.names
    for i in range(len(ds)):
        cats, masks = ds.masks(i)
        objs = [k for k, c in enumerate(cats) if ":" not in names[c]]
        parts = [k for k, c in enumerate(cats) if ":" in names[c]]
        owned: dict[int, list] = {k: [] for k in objs}
        for p in parts:
            obj, part = names[cats[p]].split(":", 1)
            cand = [k for k in objs if names[cats[k]] == obj]
            if cand:
                best = max(cand, key=lambda k: (masks[k] & masks[p]).sum())
                owned[best].append((part, masks[p]))
        for k in objs:
            inst = {"image": i, "object": cats[k], "mask": masks[k], "parts": owned[k]}
            (base if owned[k] else novel).append(inst)
    return base, novel


@torch.no_grad()
def feature_maps(ds, image_ids: list[int], kind: str, model=None, prepare=None, levels: tuple[str, ...] = ("0",),
                 batch: int = 32, progress: bool = False) -> dict:
    """{image index: (D, h, w) float16 per-position features}: raw RGB at pixel resolution ("pixels"), or
    the backbone's FPN `levels` at the finest level's grid, each level unit-normalised and the concatenation
    scaled to unit norm (so every level weighs alike). Upsampled to pixels per instance (`_at_pixels`)."""
    if kind not in ("backbone", "pixels"):
        raise ValueError(f"features must be 'backbone' or 'pixels', got {kind!r}")
    out = {}
    starts = range(0, len(image_ids), batch)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"features ({kind})", mininterval=5)
    for s in starts:
        idx = image_ids[s:s + batch]
        imgs = torch.stack([torch.from_numpy(np.array(ds[i]["image"])).permute(2, 0, 1) for i in idx])
        if kind == "pixels":
            f = F.normalize(imgs.float() / 255 - 0.5, dim=1)
        else:
            maps = model.features(prepare({"image": imgs})["image"])
            if not levels or any(lv not in maps for lv in levels):
                raise ValueError(f"levels must be among {list(maps)}, got {list(levels)}")
            size = maps[levels[0]].shape[-2:]
            f = torch.cat([F.normalize(F.interpolate(maps[lv].float(), size=size, mode="bilinear",
                                                     align_corners=False), dim=1) for lv in levels], dim=1)
            f = (f / len(levels) ** 0.5).cpu()
        for i, fi in zip(idx, f):
            out[i] = fi.half()
    return out


def pixel_features(ds, image_ids: list[int], kind: str, model=None, prepare=None, batch: int = 32,
                   levels: tuple[str, ...] = ("0",)) -> dict:
    """{image index: (D, H, W) float32 unit-norm per-pixel features} (feature_maps at pixel resolution)."""
    return {i: _at_pixels(f, ds.resolution) for i, f in
            feature_maps(ds, image_ids, kind, model, prepare, levels, batch).items()}


def _at_pixels(f: torch.Tensor, size: int) -> torch.Tensor:
    f = f.float()
    if f.shape[-1] != size:
        f = F.interpolate(f[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return F.normalize(f, dim=0)


def global_feature(feats: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    m = torch.from_numpy(mask)
    return F.normalize(feats[:, m].mean(dim=1), dim=0)


def _object_coords(mask: np.ndarray, pix: np.ndarray, flip: bool = False) -> torch.Tensor:
    """(2, N) positions of the flat pixel indices `pix` in the mask's box, scaled to [0, 1]; x mirrored
    when `flip` (the two objects face opposite ways)."""
    ys, xs = np.divmod(pix, mask.shape[1])
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    u = (xs - x0) / max(x1 - x0, 1)
    v = (ys - y0) / max(y1 - y0, 1)
    return torch.from_numpy(np.stack([1 - u if flip else u, v])).float()


def _nearest(tf, bf, tc=None, bc=None, coord_weight: float = 0.0) -> tuple[torch.Tensor, float]:
    """(index of each target column's best base column, mean best score); score = cosine similarity
    minus coord_weight * squared distance of the object-box positions. The distance is folded into one
    matmul: -w|t - b|^2 = 2w t.b - w|b|^2 - w|t|^2 (the last term is the same for every base column)."""
    if coord_weight:
        r = (2 * coord_weight) ** 0.5
        tf = torch.cat([tf, r * tc, torch.ones(1, tf.shape[1])])
        bf = torch.cat([bf, r * bc, -coord_weight * (bc * bc).sum(0, keepdim=True)])
    idx, best = [], []
    for s in range(0, tf.shape[1], 4096):
        v, i = (tf[:, s:s + 4096].t() @ bf).max(dim=1)
        if coord_weight:
            v = v - coord_weight * (tc[:, s:s + 4096] ** 2).sum(0)
        idx.append(i)
        best.append(v)
    return torch.cat(idx), float(torch.cat(best).mean())


def _labels(base_mask: np.ndarray, base_parts, names: list[str]) -> np.ndarray:
    label = np.zeros(base_mask.shape, dtype=np.int64)  # 0 = no part
    for p, m in base_parts:
        label[m & base_mask] = names.index(p) + 1
    return label


def assign(target_feats, target_mask, base_feats, base_mask, base_parts, names: list[str],
           coord_weight: float = 0.0, flip: str = "best", base_stride: int = 1) -> tuple[np.ndarray, float]:
    """(part index + 1 of each target pixel's nearest-neighbour base pixel (0 = none), match score).
    `flip`: "no", or "best" (the base's mirror image too when coordinates count; the better match wins).
    `base_stride` > 1 matches against every stride-th base pixel row and column (faster)."""
    label = _labels(base_mask, base_parts, names)
    sub = base_mask
    if base_stride > 1:
        sub = np.zeros_like(base_mask)
        sub[::base_stride, ::base_stride] = base_mask[::base_stride, ::base_stride]
        sub = sub if sub.any() else base_mask
    bpix, tpix = np.flatnonzero(sub), np.flatnonzero(target_mask)
    out = np.zeros(target_mask.size, dtype=np.int64)
    if not len(bpix) or not len(tpix):
        return out.reshape(target_mask.shape), float("-inf")
    bf = base_feats.flatten(1)[:, torch.from_numpy(bpix)].float()          # (D, Nb)
    tf = target_feats.flatten(1)[:, torch.from_numpy(tpix)].float()        # (D, Nt)
    tc = _object_coords(target_mask, tpix) if coord_weight else None
    best = None
    for mirrored in ((False, True) if coord_weight and flip == "best" else (False,)):
        bc = _object_coords(base_mask, bpix, mirrored) if coord_weight else None
        idx, score = _nearest(tf, bf, tc, bc, coord_weight)
        if best is None or score > best[1]:
            best = (idx, score)
    out[tpix] = label.ravel()[bpix[best[0].numpy()]]
    return out.reshape(target_mask.shape), best[1]


def components(assigned: np.ndarray, names: list[str], counts: dict, min_area: int = 4
               ) -> list[tuple[str, np.ndarray]]:
    """Per part name, its largest connected components of `assigned` (as many as `counts` says)."""
    out = []
    for k, name in enumerate(names):
        comp, n = ndimage.label(assigned == k + 1)
        if n == 0:
            continue
        sizes = ndimage.sum(np.ones_like(comp), comp, index=np.arange(1, n + 1))
        for c in np.argsort(-sizes)[:counts.get(name, 1)]:
            if sizes[c] >= min_area:
                out.append((name, comp == c + 1))
    return out


def transfer(target_feats: torch.Tensor, target_mask: np.ndarray, base_feats: torch.Tensor,
             base_mask: np.ndarray, base_parts: list[tuple[str, np.ndarray]], min_area: int = 4,
             coord_weight: float = 0.0, flip: str = "best") -> list[tuple[str, np.ndarray]]:
    """Part masks for the target object from its nearest-neighbour pixels in the base object (the largest
    connected component per part, as many components as the base has instances of it)."""
    names = sorted({p for p, _ in base_parts})
    assigned, _ = assign(target_feats, target_mask, base_feats, base_mask, base_parts, names, coord_weight, flip)
    counts = {n: sum(1 for p, _ in base_parts if p == n) for n in names}
    return components(assigned, names, counts, min_area)


def transfer_vote(target_feats, target_mask, bases: list[tuple], min_area: int = 4, coord_weight: float = 0.0,
                  flip: str = "best", base_stride: int = 1) -> list[tuple[str, np.ndarray]]:
    """transfer() from several base objects [(feats, mask, parts)]: each target pixel takes the part most
    of them give it (ties: the nearer base); the component count per part is the bases' median."""
    names = sorted({p for _, _, parts in bases for p, _ in parts})
    votes = np.zeros((len(names) + 1,) + target_mask.shape, dtype=np.float32)
    for rank, (bfeat, bmask, bparts) in enumerate(bases):
        a, _ = assign(target_feats, target_mask, bfeat, bmask, bparts, names, coord_weight, flip, base_stride)
        np.put_along_axis(votes, a[None], np.take_along_axis(votes, a[None], 0) + 1 - 1e-3 * rank, 0)
    assigned = np.where(target_mask, votes.argmax(0), 0)
    counts = {n: max(1, int(np.median([sum(1 for p, _ in parts if p == n) for _, _, parts in bases
                                        if any(p == n for p, _ in parts)])))
              for n in names}
    return components(assigned, names, counts, min_area)


def _nearest_bases(bglob: torch.Tensor, g: torch.Tensor, k: int, allowed: torch.Tensor | None = None) -> list[int]:
    sim = bglob @ g
    if allowed is not None:
        sim = sim.masked_fill(~allowed, float("-inf"))
    k = min(k, int(torch.isfinite(sim).sum()))
    return sim.topk(k).indices.tolist() if k else []


def _parse_one(inst, feats, base, bglob, res, opts, allowed=None):
    f = _at_pixels(feats[inst["image"]], res)
    picks = _nearest_bases(bglob, global_feature(f, inst["mask"]), opts["neighbours"], allowed)
    bases = [(_at_pixels(feats[base[b]["image"]], res), base[b]["mask"], base[b]["parts"]) for b in picks]
    if not bases:
        return []
    return transfer_vote(f, inst["mask"], bases, coord_weight=opts["coord_weight"], flip=opts["flip"],
                         base_stride=opts["base_stride"])


# chosen on base objects only (base_quality: a dog parsed from horses, cars, trucks), never on novel parts
PARSE_DEFAULTS = dict(levels=("0",), neighbours=1, coord_weight=1.0, flip="best", base_stride=2)


def parse(ds, kind: str = "backbone", model=None, prepare=None, max_base: int = 1000, progress: bool = True,
          **options) -> tuple[dict, dict]:
    """(COCO dict of parsed part annotations, stats) for every novel-object instance of `ds`. `options`:
    PARSE_DEFAULTS' keys (FPN levels, nearest base objects voting, weight of the object-box position,
    mirror search, base pixel stride)."""
    opts = {**PARSE_DEFAULTS, **options}
    if set(opts) != set(PARSE_DEFAULTS):
        raise TypeError(f"unknown parse options {sorted(set(opts) - set(PARSE_DEFAULTS))}")
    base, novel = instances(ds)
    if not base:
        raise ValueError("no base object with part annotations to parse from")
    base = base[:max_base]
    ids = sorted({b["image"] for b in base} | {n["image"] for n in novel})
    feats = feature_maps(ds, ids, kind, model, prepare, tuple(opts["levels"]), progress=progress)
    res = ds.resolution
    bglob = torch.stack([global_feature(_at_pixels(feats[b["image"]], res), b["mask"]) for b in base])
    cat_id = {c["name"]: c["id"] for c in ds.categories}
    anns, missing = [], 0
    it = novel
    if progress:
        from tqdm import tqdm

        it = tqdm(novel, desc=f"parse ({kind})", mininterval=5)
    for inst in it:
        obj = ds.names[inst["object"]]
        for part, m in _parse_one(inst, feats, base, bglob, res, opts):
            cid = cat_id.get(f"{obj}:{part}")
            if cid is None:
                missing += 1
                continue
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            ys, xs = np.where(m)
            rle["counts"] = rle["counts"].decode("ascii")
            anns.append({"id": len(anns) + 1, "image_id": ds.images[inst["image"]]["id"], "category_id": cid,
                         "segmentation": rle, "area": float(m.sum()),
                         "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                                  float(ys.max() - ys.min() + 1)], "iscrowd": 0, "parsed": True})
    stats = {"novel_instances": len(novel), "base_instances": len(base), "parsed_parts": len(anns),
             "parts_without_category": missing, "features": kind,
             "options": {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}}
    return {"images": [dict(im, width=ds.resolution, height=ds.resolution) for im in ds.images],
            "annotations": anns, "categories": ds.categories, "info": stats}, stats


def base_quality(ds, kind: str = "backbone", model=None, prepare=None, n: int = 100, max_base: int = 1000,
                 **options) -> dict:
    """Parsing checked where the protocol allows it, on base objects only: `n` base instances are parsed
    as if novel, from base objects of *other* categories (a dog from horses, cars, trucks: cross-category
    like a cat from dogs), and scored against their own part annotations (mean best IoU per true part,
    fraction >= 0.5). Novel parts are never looked at, so options can be chosen on this."""
    opts = {**PARSE_DEFAULTS, **options}
    base, _ = instances(ds)
    base = base[:max_base]
    rng = np.random.default_rng(0)
    probe = [base[i] for i in sorted(rng.choice(len(base), size=min(n, len(base)), replace=False))]
    ids = sorted({b["image"] for b in base})
    feats = feature_maps(ds, ids, kind, model, prepare, tuple(opts["levels"]))
    res = ds.resolution
    bglob = torch.stack([global_feature(_at_pixels(feats[b["image"]], res), b["mask"]) for b in base])
    objs = torch.tensor([b["object"] for b in base])
    ious = []
    for inst in probe:
        got = _parse_one(inst, feats, base, bglob, res, opts, allowed=objs != inst["object"])
        for part, m in inst["parts"]:
            ious.append(max([float((p & m).sum() / max((p | m).sum(), 1)) for q, p in got if q == part],
                            default=0.0))
    return {"mean_iou": float(np.mean(ious)) if ious else 0.0,
            "iou50": float(np.mean([v >= 0.5 for v in ious])) if ious else 0.0, "parts": len(ious)}


def part_quality(parsed: dict, truth_ds) -> dict:
    """How well parsed parts match ground-truth parts of the same images (shapes-parts knows them):
    mean best IoU per ground-truth novel part instance, and the fraction above 0.5."""
    from train.vlpart.data import _decode

    by_image: dict[int, list] = {}
    for a in parsed["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    ious = []
    novel = {k for k, c in enumerate(truth_ds.categories) if c.get("split") == "novel" and ":" in c["name"]}
    for i, im in enumerate(truth_ds.images):
        cats, masks = truth_ds.masks(i)
        preds = by_image.get(im["id"], [])
        for c, m in zip(cats, masks):
            if c not in novel:
                continue
            best = 0.0
            for a in preds:
                if a["category_id"] == truth_ds.categories[c]["id"]:
                    p = _decode(a["segmentation"], truth_ds.resolution, truth_ds.resolution)
                    best = max(best, float((p & m).sum() / max((p | m).sum(), 1)))
            ious.append(best)
    return {"mean_iou": float(np.mean(ious)) if ious else 0.0,
            "iou50": float(np.mean([v >= 0.5 for v in ious])) if ious else 0.0, "parts": len(ious)}


def write(doc: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(doc, f)
