"""`kfe vlpart parse`: novel objects parsed into parts by dense correspondence with base objects (VLPart, Sec. 3.3).

For every novel-object instance of the training data (object mask + name, no parts):
1. the nearest base-object instance (one with part annotations) by the cosine similarity of their global
   features (the backbone's features averaged inside each object's mask);
2. every pixel inside the novel object's mask takes the part of its nearest-neighbour pixel inside the
   base object's mask (cosine similarity of per-pixel features; base pixels outside every part are
   "no part");
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
def pixel_features(ds, image_ids: list[int], kind: str, model=None, prepare=None, batch: int = 32) -> dict:
    """{image index: (D, H, W) float32 unit-norm per-pixel features}."""
    out = {}
    for s in range(0, len(image_ids), batch):
        idx = image_ids[s:s + batch]
        imgs = torch.stack([torch.from_numpy(np.array(ds[i]["image"])).permute(2, 0, 1) for i in idx])
        if kind == "pixels":
            f = imgs.float() / 255 - 0.5
        elif kind == "backbone":
            x = prepare({"image": imgs})["image"]
            f = model.features(x)["0"]
            f = F.interpolate(f, size=imgs.shape[-2:], mode="bilinear", align_corners=False).cpu()
        else:
            raise ValueError(f"features must be 'backbone' or 'pixels', got {kind!r}")
        f = F.normalize(f.float(), dim=1)
        for i, fi in zip(idx, f):
            out[i] = fi
    return out


def global_feature(feats: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    m = torch.from_numpy(mask)
    return F.normalize(feats[:, m].mean(dim=1), dim=0)


def transfer(target_feats: torch.Tensor, target_mask: np.ndarray, base_feats: torch.Tensor,
             base_mask: np.ndarray, base_parts: list[tuple[str, np.ndarray]], min_area: int = 4
             ) -> list[tuple[str, np.ndarray]]:
    """Part masks for the target object from its nearest-neighbour pixels in the base object."""
    names = sorted({p for p, _ in base_parts})
    label = np.zeros(base_mask.shape, dtype=np.int64)  # 0 = no part
    for p, m in base_parts:
        label[m & base_mask] = names.index(p) + 1
    bpix = np.flatnonzero(base_mask)
    tpix = np.flatnonzero(target_mask)
    if not len(bpix) or not len(tpix):
        return []
    bf = base_feats.flatten(1)[:, torch.from_numpy(bpix)]          # (D, Nb)
    tf = target_feats.flatten(1)[:, torch.from_numpy(tpix)]        # (D, Nt)
    nn_idx = torch.cat([(tf[:, s:s + 4096].t() @ bf).argmax(dim=1) for s in range(0, tf.shape[1], 4096)])
    assigned = np.zeros(target_mask.size, dtype=np.int64)
    assigned[tpix] = label.ravel()[bpix[nn_idx.numpy()]]
    assigned = assigned.reshape(target_mask.shape)
    out = []
    for k, name in enumerate(names):
        count = sum(1 for p, _ in base_parts if p == name)  # keep as many components as the base has
        comp, n = ndimage.label(assigned == k + 1)
        if n == 0:
            continue
        sizes = ndimage.sum(np.ones_like(comp), comp, index=np.arange(1, n + 1))
        for c in np.argsort(-sizes)[:count]:
            if sizes[c] >= min_area:
                out.append((name, comp == c + 1))
    return out


def parse(ds, kind: str = "backbone", model=None, prepare=None, max_base: int = 1000,
          progress: bool = True) -> tuple[dict, dict]:
    """(COCO dict of parsed part annotations, stats) for every novel-object instance of `ds`."""
    base, novel = instances(ds)
    if not base:
        raise ValueError("no base object with part annotations to parse from")
    base = base[:max_base]
    ids = sorted({b["image"] for b in base} | {n["image"] for n in novel})
    feats = pixel_features(ds, ids, kind, model, prepare)
    bglob = torch.stack([global_feature(feats[b["image"]], b["mask"]) for b in base])
    cat_id = {c["name"]: c["id"] for c in ds.categories}
    anns, missing = [], 0
    it = novel
    if progress:
        from tqdm import tqdm

        it = tqdm(novel, desc=f"parse ({kind})", mininterval=5)
    for inst in it:
        obj = ds.names[inst["object"]]
        f = feats[inst["image"]]
        b = base[int((bglob @ global_feature(f, inst["mask"])).argmax())]
        for part, m in transfer(f, inst["mask"], feats[b["image"]], b["mask"], b["parts"]):
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
             "parts_without_category": missing, "features": kind}
    return {"images": [dict(im, width=ds.resolution, height=ds.resolution) for im in ds.images],
            "annotations": anns, "categories": ds.categories, "info": stats}, stats


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
