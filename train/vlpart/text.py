"""Text embeddings of a vocabulary: from an embedding file (JSON {"names": {text: [floats]}}, written by
`kfe vlpart embed` with the MiniLM text tower in models/vlpart/minilm.py) or, where a name is missing
from the file, computed by that tower when its weights are installed.

A category name "dog:head" is embedded as the text "dog head" (VLPart's part names)."""
from __future__ import annotations

import json
import os

import torch

DEFAULT_FILE = os.path.join(os.path.dirname(__file__), "text_embeddings.json")


def prompt(name: str) -> str:
    return " ".join(name.replace(":", " ").replace("_", " ").split())


def load_file(path: str) -> dict[str, list[float]]:
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("names"), dict):
        raise ValueError(f"{path}: an embedding file is JSON {{\"names\": {{text: [floats]}}}}")
    return doc["names"]


def embed(names: list[str], path: str = "") -> torch.Tensor:
    """(len(names), D) float32 embeddings of the vocabulary `names`."""
    if not names:
        raise ValueError("the vocabulary is empty")
    table = load_file(path or DEFAULT_FILE)
    texts = [prompt(n) for n in names]
    missing = [t for t in texts if t not in table]
    if missing:
        from models.vlpart.minilm import MiniLM

        try:
            tower = MiniLM()
        except FileNotFoundError as err:
            raise ValueError(f"no embedding for {missing} in {path or DEFAULT_FILE} and {err}") from None
        table = dict(table, **dict(zip(missing, tower(missing).tolist())))
    return torch.tensor([table[t] for t in texts], dtype=torch.float32)


def write_file(texts: list[str], out: str, model_dir: str | None = None) -> dict:
    from models.vlpart.minilm import MiniLM

    vecs = MiniLM(model_dir)([prompt(t) for t in texts])
    doc = {"model": "sentence-transformers/all-MiniLM-L6-v2 (models/vlpart/minilm.py)",
           "names": {prompt(t): [round(float(v), 5) for v in vec] for t, vec in zip(texts, vecs)}}
    with open(out, "w") as f:
        json.dump(doc, f)
    return doc
