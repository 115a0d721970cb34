"""Atomic checkpoints, RNG capture, `--resume auto`, and plain state-dict export.

A checkpoint is one file, `<run>/ckpt-<step:08d>.pt`, written to a temporary name in the same
directory, fsynced, then renamed with os.replace (atomic on POSIX): a run killed at any moment leaves
either the previous checkpoints or the new one, never half a file. It holds the model, optimizer,
scheduler, EMA, every rank's RNG states (python, numpy, torch, cuda) and data-loader state, the step,
and the resolved config.
"""
from __future__ import annotations

import glob
import os
import random
import re
import warnings

import numpy as np
import torch

_NAME = re.compile(r"ckpt-(\d{8})\.(pt|dcp)$")  # .dcp: an FSDP2 run's sharded checkpoint (train/dcp.py)
FORMAT_VERSION = 1


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
    # weights_only=False: our own files hold numpy RNG states and plain python objects.
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a KFE training checkpoint (format {FORMAT_VERSION})")
    return ckpt


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
        except Exception as err:  # noqa: BLE001 - an unreadable file is skipped, the next older one tried
            warnings.warn(f"skipping unreadable checkpoint {p}: {err!r}")
    return None


# ---------------------------------------------------------------- RNG states

def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
