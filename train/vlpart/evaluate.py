"""pycocotools COCOeval (segm and bbox) of a VLPart model: AP and AP50 for base parts, novel parts and
objects. The ground truth is the held-out dataset's annotations at the model's resolution; the model
predicts with the vocabulary of the dataset's category names (or renamed ones: the vocabulary is open).
"""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

GROUPS = ("base_parts", "novel_parts", "objects")


def group_of(cat: dict) -> str:
    kind = cat.get("kind") or ("part" if ":" in cat["name"] else "object")
    if kind == "object":
        return "objects"
    return "novel_parts" if cat.get("split") == "novel" else "base_parts"


def ground_truth(ds, indices) -> dict:
    r = ds.resolution
    images, anns = [], []
    for i in indices:
        images.append({"id": i + 1, "width": r, "height": r})
        cats, masks = ds.masks(i)
        for c, m in zip(cats, masks):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c + 1, "segmentation": rle,
                         "area": float(m.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0})
    cats = [{"id": k + 1, "name": c["name"]} for k, c in enumerate(ds.categories)]
    return {"images": images, "annotations": anns, "categories": cats}


def predictions(model, ds, indices, text, prepare, batch: int = 16) -> list[dict]:
    out = []
    for s in range(0, len(indices), batch):
        idx = indices[s:s + batch]
        images = torch.stack([torch.from_numpy(np.array(ds[i]["image"])).permute(2, 0, 1) for i in idx])
        x = prepare({"image": images})["image"]
        for i, det in zip(idx, model.detect(x, text.to(x.device))):
            masks = (det["masks"] > 0.5).cpu().numpy().astype(np.uint8)
            for box, score, label, m in zip(det["boxes"].tolist(), det["scores"].tolist(),
                                            det["labels"].tolist(), masks):
                rle = mask_utils.encode(np.asfortranarray(m))
                rle["counts"] = rle["counts"].decode("ascii")
                out.append({"image_id": i + 1, "category_id": label + 1, "score": score, "segmentation": rle,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    return out


def coco_metrics(gt: dict, dets: list[dict], categories: list[dict]) -> dict:
    """{"segm_base_parts_AP50": ..., ...} in percent; -1 where a group has no ground truth."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([dict(d) for d in dets]) if dets else None
    present = {a["category_id"] for a in gt["annotations"]}
    metrics = {}
    for iou_type in ("segm", "bbox"):
        for group in GROUPS:
            ids = [k + 1 for k, c in enumerate(categories) if group_of(c) == group and k + 1 in present]
            ap = ap50 = -1.0
            if ids and coco_dt is not None:
                with contextlib.redirect_stdout(io.StringIO()):
                    ev = COCOeval(coco_gt, coco_dt, iou_type)
                    ev.params.catIds = ids
                    ev.params.imgIds = [im["id"] for im in gt["images"]]
                    ev.evaluate()
                    ev.accumulate()
                    ev.summarize()
                ap, ap50 = 100 * float(ev.stats[0]), 100 * float(ev.stats[1])
            elif ids:
                ap = ap50 = 0.0
            metrics[f"{iou_type}_{group}_AP"] = ap
            metrics[f"{iou_type}_{group}_AP50"] = ap50
    return metrics


def describe(m: dict) -> str:
    def f(k):
        return "n/a" if m.get(k, -1) < 0 else f"{m[k]:.1f}"
    return " | ".join(f"{g.replace('_', ' ')}: segm AP {f(f'segm_{g}_AP')} AP50 {f(f'segm_{g}_AP50')}, "
                      f"box AP50 {f(f'bbox_{g}_AP50')}" for g in GROUPS)


def write_json(metrics: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(metrics, f, indent=1, sort_keys=True)
