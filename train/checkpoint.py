"""Atomic checkpoints, RNG capture, `--resume auto`, and plain state-dict export.

A checkpoint is one file, `<run>/ckpt-<step:08d>.pt`, written to a temporary name in the same
directory, fsynced, then renamed with os.replace (atomic on POSIX): a run killed at any moment leaves
either the previous checkpoints or the new one, never half a file. It holds the model, optimizer,
scheduler, EMA, every rank's RNG states (python, numpy, torch, cuda) and data-loader state, the step,
and the resolved config.

Loading is safe: every file is read with `torch.load(weights_only=True)`, which builds only tensors and
plain Python data and refuses any other object, so no checkpoint (ours or one from elsewhere) can run code
here. Our own files are written that way (format 2: the numpy RNG state as a tensor); format-1 files (numpy
arrays inside) are converted once by `kfe checkpoint upgrade FILE`, which reads them with an allow-list
of numpy's array constructors only - there is no fallback to `weights_only=False` anywhere.
"""
from __future__ import annotations

import glob
import os
import pickle
import random
import re
import warnings

import numpy as np
import torch

_NAME = re.compile(r"ckpt-(\d{8})\.(pt|dcp)$")  # .dcp: an FSDP2 run's sharded checkpoint (train/dcp.py)
FORMAT_VERSION = 2  # 1: numpy RNG state as an ndarray (needs `kfe checkpoint upgrade`)


class UnsafeCheckpointError(ValueError):
    """A file holding Python objects other than tensors and plain data (refused, never executed)."""


def safe_load(path: str, what: str = "checkpoint"):
    """torch.load(weights_only=True) with a one-line error naming the file when it holds other objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if not found:  # not a pickle of ours at all (truncated, garbage): unreadable, not hostile
            raise ValueError(f"cannot read {what} {path!r}: not a torch.save file") from None
        detail = f"it references {found.group(1)}"
        raise UnsafeCheckpointError(
            f"refusing to load {what} {path!r}: {detail}, not only tensors and plain data (a KFE checkpoint "
            f"from before format 2 is converted once by `kfe checkpoint upgrade {path}`)") from None


def path_for(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"ckpt-{step:08d}.pt")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the finished checkpoints in a run directory, oldest first."""
    out = []
    for p in glob.glob(os.path.join(run_dir, "ckpt-*")):
        m = _NAME.search(os.path.basename(p))
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def atomic_save(obj, path: str) -> None:
    """torch.save to a temp file next to `path`, fsync, os.replace, fsync the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(run_dir: str) -> None:
    """Temp files left by a run killed mid-write (they are never read)."""
    for p in glob.glob(os.path.join(run_dir, ".ckpt-*.pt.tmp.*")):
        os.remove(p)


def prune(run_dir: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps everything)."""
    if keep <= 0:
        return
    for _, p in list_checkpoints(run_dir)[:-keep]:
        if os.path.isdir(p):  # sharded (.dcp)
            import shutil
            shutil.rmtree(p)
        else:
            os.remove(p)


def load(path: str) -> dict:
    if os.path.isdir(path):  # a sharded checkpoint: its metadata; the tensors stay in the shards
        from train import dcp
        return dcp.read_meta(path)
    ckpt = safe_load(path)
    if isinstance(ckpt, dict) and ckpt.get("format") == 1:
        raise UnsafeCheckpointError(f"{path} is a format-1 KFE checkpoint: convert it once with "
                                    f"`kfe checkpoint upgrade {path}`")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a KFE training checkpoint (format {FORMAT_VERSION})")
    return ckpt


def upgrade(path: str, out: str | None = None) -> str:
    """Rewrite a format-1 checkpoint (numpy RNG arrays inside) as format 2, in place unless `out`.

    Read with weights_only=True plus an allow-list of numpy's ndarray reconstruction only (what format 1
    holds beyond plain data): anything else in the file is still refused.
    """
    from numpy._core.multiarray import _reconstruct  # numpy 2 (the pinned install)

    allowed = [np.ndarray, np.dtype, _reconstruct, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(allowed):
        ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (1, FORMAT_VERSION):
        raise ValueError(f"{path} is not a KFE training checkpoint")
    if ckpt["format"] == 1:
        ckpt["rng"] = [_rng_to_plain(r) for r in ckpt["rng"]]
        ckpt["format"] = FORMAT_VERSION
    atomic_save(ckpt, out or path)
    return out or path


def find_resume(run_dir: str, resume: str) -> str | None:
    """'' -> None; 'auto' -> the newest checkpoint that loads (None if there is none); else the path."""
    if not resume:
        return None
    if resume != "auto":
        if not os.path.exists(resume):
            raise FileNotFoundError(f"--resume {resume!r}: no such checkpoint file")
        return resume
    for step, p in reversed(list_checkpoints(run_dir)):
        try:
            load(p)
            return p
        except UnsafeCheckpointError:  # never skipped: resuming an older checkpoint would lose steps silently
            raise
        except Exception as err:  # noqa: BLE001 - an unreadable file is skipped, the next older one tried
            warnings.warn(f"skipping unreadable checkpoint {p}: {err!r}")
    return None


# ---------------------------------------------------------------- RNG states

def _rng_to_plain(state: dict) -> dict:
    """numpy's legacy state tuple -> a tensor and plain numbers (weights_only-loadable)."""
    name, keys, pos, has_gauss, gauss = state["numpy"]
    return {**state, "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, np.int64)),
                               "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}}


def rng_state() -> dict:
    state = _rng_to_plain({"python": random.getstate(), "numpy": np.random.get_state(),
                           "torch": torch.get_rng_state()})
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- export

def clean_state_dict(sd: dict) -> dict:
    """Strip wrapper prefixes (DDP 'module.', torch.compile '_orig_mod.') so keys match the official ones."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v.detach().cpu() if isinstance(v, torch.Tensor) else v
    return out


def export(ckpt: dict, out_path: str, ema: bool = False, official=None) -> dict:
    """Write a checkpoint's weights as a plain state dict (.pt, or .safetensors by extension).

    `official` maps the trained module's state dict to the official repository's keys (a recipe's
    Recipe.export; the identity for models whose keys already match, as ConvNeXt's do).
    """
    if ema and ckpt.get("ema") is None:
        raise ValueError("this checkpoint has no EMA weights (the run had ema = false)")
    sd = clean_state_dict(ckpt["ema"] if ema else ckpt["model"])
    if official is not None:
        sd = official(sd)
    if out_path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, out_path)
    else:
        atomic_save(sd, out_path)
    return sd
