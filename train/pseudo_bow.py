"""`kfe pseudo-bow RUN --data IMAGES --out captions.jsonl`: bag-of-words captions for uncaptioned images
from a trained image-text model (A Fistful of Words, Tejankar et al., arXiv 2112.13884, Sec. 3.3).

Every vocabulary word is put into `template` ("{}": the word alone) and embedded by the run's text
tower; every image of IMAGES (shapes, or an ImageFolder: labelled or not, all of it) by its image
tower; an image's caption is its top-k words by cosine similarity (train.curation.bow.pseudo_bow),
most similar first. The vocabulary is the run's word tokenizer minus stop-words, or `--vocab FILE`
(one word per line; needed with the byte tokenizer). Output: one JSON line per image,
{"index": i, "caption": "w1 w2 ...", "scores": [...], "id": <file path or "shapes:i">}; train on it
with `kfe train clip --data IMAGES --captions_file captions.jsonl` (index i = sample i of IMAGES).
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from train.curation.bow import STOP_WORDS, pseudo_bow
from train.data import eval_batches, kind_of, open_eval
from train.data.tokenizer import WordTokenizer


def vocabulary(tokenizer, vocab_file: str | None = None) -> list[str]:
    if vocab_file:
        with open(vocab_file) as f:
            words = list(dict.fromkeys(w.strip() for w in f if w.strip()))
    elif isinstance(tokenizer, WordTokenizer):
        words = [w for w in tokenizer.vocab if w not in STOP_WORDS]
    else:
        raise ValueError("the run's tokenizer has no word vocabulary (byte tokenizer): give --vocab FILE")
    if not words:
        raise ValueError("the vocabulary is empty")
    return words


@torch.no_grad()
def assign(run: str, images: str, k: int = 5, out: str | None = None, vocab_file: str | None = None,
           template: str = "{}", batch: int = 256, limit: int | None = None,
           overrides: list[str] | None = None) -> list[dict]:
    """Pseudo-BoW captions of `images` from the newest checkpoint of `run` (or a checkpoint file);
    `overrides` (--key value) change the run's config, e.g. ["--shapes.size", "5000"] to caption shapes
    images beyond those the run trained on (the run's own tokenizer.json is read: `--resume auto`, since
    a word vocabulary rebuilt from the changed data could differ)."""
    from train.run import load_for_eval

    if "{}" not in template:
        raise ValueError(f"template must contain '{{}}', got {template!r}")
    recipe, cfg, data, task, module, prepare, info, step = load_for_eval(
        run, ["--num_workers", "0", *(["--resume", "auto", *overrides] if overrides else [])])
    if not hasattr(module, "encode_text"):
        raise ValueError(f"{run} is a {recipe.name} run: pseudo-BoW needs an image-text model (clip, slip, cit)")
    words = vocabulary(data.tokenizer, vocab_file)
    split = open_eval(images, resolution=cfg.resolution, fields=("image",), seed=cfg.seed, shapes=cfg.shapes,
                      split="train", whole=True)
    if split is None:
        raise ValueError(f"no images in {images!r}")
    ids = data.tokenizer([template.replace("{}", w) for w in words], cfg.context_length).to(info.device)
    word_emb = torch.cat([module.encode_text(ids[i:i + batch]) for i in range(0, len(words), batch)]).float()
    index, image_emb = [], []
    for b in eval_batches(split.dataset, batch, 0, 1, limit=limit):
        index += b["index"].tolist()
        image_emb.append(module.encode_image(prepare(b)["image"]).float())
    top, scores, captions = pseudo_bow(torch.cat(image_emb), word_emb, k, words)
    files = getattr(getattr(split.dataset, "base", None), "files", None)
    records = [{"index": i, "caption": c, "scores": [round(float(s), 5) for s in sc],
                "id": files[i] if files is not None else f"{kind_of(images)}:{i}"}
               for i, c, sc in zip(index, captions, scores)]
    if out:
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(tmp, out)
        print(f"wrote {len(records)} pseudo-BoW captions (top {k} of {len(words)} words, {recipe.name} run at step "
              f"{step}) to {out}; e.g. {records[0]['id']}: {records[0]['caption']!r}")
    return records


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pseudo-bow", help="caption images with a trained clip/slip/cit run's top-k vocabulary words",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run directory (newest checkpoint) or a ckpt-*.pt file")
    p.add_argument("--data", required=True, help="the images: 'shapes' or an ImageFolder directory")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--k", type=int, default=5, help="words per caption")
    p.add_argument("--vocab", default=None, help="one word per line (default: the run's word vocabulary)")
    p.add_argument("--template", default="{}", help="how a word is put into text for the text tower")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.set_defaults(func=_command)


def _command(args) -> int:
    import sys

    from train.data import DataError

    try:
        assign(args.run, args.data, args.k, args.out, args.vocab, args.template, limit=args.limit)
    except (DataError, FileNotFoundError, ValueError) as err:
        print(f"kfe pseudo-bow: error: {err}", file=sys.stderr)
        return 2
    return 0
