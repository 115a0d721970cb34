"""ImageFolder directories: `root/<class>/<image>` (classification) or `root/**/<image>` (unlabelled).

A root whose top level holds image files is unlabelled (every image below it, label -1); otherwise
each subdirectory holding images is a class, named by the directory, indexed in sorted order (as
torchvision's ImageFolder). Files are listed once, sorted, so index i means the same file on every
process. A file that does not decode is skipped and counted (`corrupt_image`), never fatal.
"""
from __future__ import annotations

import os

import numpy as np

from train.data.transforms import BadSample, decode_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f)]
    return out


class ImageFolder:
    """Map-style: `ds[i]` -> {"image": PIL RGB, "label": int (-1 unlabelled), "caption": class name or ""}.

    Raises BadSample('corrupt_image') for an undecodable file (the loader skips and counts it).
    """

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"ImageFolder root {root!r} is not a directory")
        top = sorted(os.listdir(root))
        self.root = root
        if any(_is_image(f) and os.path.isfile(os.path.join(root, f)) for f in top):
            self.class_names: list[str] | None = None
            self.files = _walk_images(root)
            self.labels = np.full(len(self.files), -1, dtype=np.int64)
        else:
            classes = [d for d in top if os.path.isdir(os.path.join(root, d))]
            files, labels, names = [], [], []
            for d in classes:
                imgs = _walk_images(os.path.join(root, d))
                if imgs:
                    names.append(d)
                    files += imgs
                    labels += [len(names) - 1] * len(imgs)
            self.class_names, self.files, self.labels = names, files, np.asarray(labels, dtype=np.int64)
        if not self.files:
            raise FileNotFoundError(f"ImageFolder {root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")

    @property
    def labelled(self) -> bool:
        return self.class_names is not None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise BadSample("unreadable_file", f"{path}: {err}") from None
        label = int(self.labels[index])
        return {"image": decode_image(data, path), "label": label,
                "caption": self.class_names[label] if label >= 0 else "", "index": index}
