"""Sharded checkpoints for FSDP2 runs, with torch.distributed.checkpoint (DCP).

An FSDP2 run on several processes writes `<run>/ckpt-<step:08d>.dcp/`: every rank writes its own shards
of the model and optimizer state (DCP's `__<rank>_0.distcp` files, and rank 0 the `.metadata` index);
rank 0 adds `kfe-meta.pt` (step, config, scheduler, every rank's RNG and data position: the rest of a
KFE checkpoint). Nothing is gathered on one process.

Atomic: everything is written into `.ckpt-<step>.dcp.tmp/`; once every rank has finished (a barrier)
rank 0 fsyncs and renames it to `ckpt-<step>.dcp` (a directory rename is atomic on POSIX). A run killed
before the rename leaves only the temporary directory, which the next start removes; a checkpoint
therefore counts only once complete.

Resume on any world size: the loader reads the saved shards into whatever sharding this run has (1
process: plain tensors; N processes: FSDP2 DTensors), for the model and the optimizer (DCP reshards).
`kfe export` / `kfe eval` read the full model state from the shards. DCP's `.metadata` is a pickle, as
is kfe-meta.pt: a sharded checkpoint is read only from the run's own directory (`--resume auto`), never
from a path elsewhere.
"""
from __future__ import annotations

import glob
import os
import shutil

import torch

SUFFIX = ".dcp"
META = "kfe-meta.pt"


def path_for(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"ckpt-{step:08d}{SUFFIX}")


def remove_stale(run_dir: str) -> None:
    """Temporary directories of a save that was killed (never complete, never read)."""
    for p in glob.glob(os.path.join(run_dir, f".ckpt-*{SUFFIX}.tmp")):
        shutil.rmtree(p, ignore_errors=True)


def _fsync_tree(path: str) -> None:
    for name in os.listdir(path):
        with open(os.path.join(path, name), "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Saver:
    """Collective saves of one run. async_save: the shards are copied to CPU memory, then written by a
    background thread (over a gloo group of its own, apart from training's collectives) while training
    goes on; the checkpoint is committed (metadata + rename) at the next save or at `wait()`, so an
    unfinished one never counts."""

    def __init__(self, info, async_save: bool = False):
        import torch.distributed as dist

        self.info, self.pending = info, None
        self.group = dist.new_group(backend="gloo") if async_save else None

    def save(self, run_dir: str, step: int, module, optimizer, meta: dict, on_commit=None) -> str:
        """Every rank writes its shards; rank 0 the metadata, then the rename that commits it."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.wait()
        final = path_for(run_dir, step)
        tmp = os.path.join(run_dir, f".{os.path.basename(final)}.tmp")
        if self.info.main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(module, optimizer)  # this rank's shards (DTensors), no gathering
        state = {"model": model_sd, "optimizer": optim_sd}
        if self.group is not None:
            future = dcp.async_save(state, checkpoint_id=tmp, process_group=self.group)
            self.pending = (future, tmp, final, run_dir, meta, on_commit)
        else:
            dcp.save(state, checkpoint_id=tmp)
            _commit(tmp, final, run_dir, meta, self.info)
            if on_commit is not None:
                on_commit()
        return final

    def wait(self) -> None:
        """Finish and commit the save in flight (collective)."""
        if self.pending is None:
            return
        future, tmp, final, run_dir, meta, on_commit = self.pending
        self.pending = None
        future.result()
        _commit(tmp, final, run_dir, meta, self.info)
        if on_commit is not None:
            on_commit()


def _commit(tmp: str, final: str, run_dir: str, meta: dict, info) -> None:
    import torch.distributed as dist

    dist.barrier()  # every rank's shards are written
    if info.main:
        torch.save(meta, os.path.join(tmp, META))
        _fsync_tree(tmp)
        if os.path.exists(final):  # a re-save of the same step (e.g. after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fd = os.open(run_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    dist.barrier()


def read_meta(path: str) -> dict:
    """The non-tensor part of a sharded checkpoint, with "dcp": its path (the tensors stay on disk)."""
    if not os.path.isfile(os.path.join(path, ".metadata")) or not os.path.isfile(os.path.join(path, META)):
        raise ValueError(f"{path} is not a complete sharded checkpoint (no .metadata or {META})")
    from train.checkpoint import safe_load  # weights_only=True, as every other checkpoint file

    meta = safe_load(os.path.join(path, META))
    return {**meta, "dcp": path}


def check_own(path: str, run_dir: str) -> None:
    if os.path.realpath(os.path.dirname(os.path.abspath(path))) != os.path.realpath(run_dir):
        raise ValueError(f"--resume {path}: a sharded checkpoint is resumed only from the run's own directory "
                         f"({run_dir}; its metadata is a pickle): use --out {os.path.dirname(path)} --resume auto")


def load_into(path: str, module, optimizer) -> None:
    """Model and optimizer state from the shards, resharded to this run's layout (any world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(module, optimizer)  # the layout to fill (allocated here)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_model_state(path: str) -> dict:
    """The whole model state dict as plain CPU tensors (kfe export / eval), read from the shards."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    return dict(_load_state_dict_from_keys(keys={"model"}, checkpoint_id=path)["model"])
