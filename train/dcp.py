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
`kfe export` / `kfe eval` read the full model state from the shards. Reading is safe, as for a one-file
checkpoint: kfe-meta.pt with torch.load(weights_only=True); DCP's `.metadata` (a plain pickle, which DCP's
own reader unpickles freely) with an unpickler that builds only DCP's metadata classes, torch sizes, dtypes
and layouts and paths, refusing anything else; the non-tensor items in the shards with weights_only=True
(DCP's default planner reads them with weights_only=False). `--resume` still takes a sharded checkpoint only
from the run's own directory (its resharding needs this run's layout).
"""
from __future__ import annotations

import glob
import os
import pickle
import re
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
    _safe_reader(path).read_metadata()  # DCP's index (a pickle) refused here, before any DCP call reads it
    return {**meta, "dcp": path}


def check_own(path: str, run_dir: str) -> None:
    if os.path.realpath(os.path.dirname(os.path.abspath(path))) != os.path.realpath(run_dir):
        raise ValueError(f"--resume {path}: a sharded checkpoint is resumed only from the run's own directory "
                         f"({run_dir}): use --out {os.path.dirname(path)} --resume auto")


# What a DCP `.metadata` pickle may construct (everything else is refused): DCP's metadata dataclasses,
# the reader's storage records, torch.Size / dtypes / layouts, and the checkpoint's path.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _METADATA_GLOBALS.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it references {module}.{name}")


def _safe_reader(path: str):
    """DCP's FileSystemReader, its metadata read by _MetadataUnpickler instead of pickle.load."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    from train.checkpoint import UnsafeCheckpointError

    class SafeReader(FileSystemReader):
        unsafe: UnsafeCheckpointError | None = None

        def read_metadata(self, *args, **kwargs):
            file = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(file, "rb") as f:
                try:
                    metadata = _MetadataUnpickler(f).load()
                except pickle.UnpicklingError as err:
                    self.unsafe = UnsafeCheckpointError(
                        f"refusing to load sharded checkpoint metadata {str(file)!r}: {err}, not only DCP "
                        "metadata")
                    raise self.unsafe from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def _weights_only_bytes(planner_cls):
    """A DCP load planner reading the shards' non-tensor items with torch.load(weights_only=True)."""
    from torch.distributed.checkpoint._traverse import set_element

    from train.checkpoint import UnsafeCheckpointError

    class Planner(planner_cls):
        unsafe: UnsafeCheckpointError | None = None

        def load_bytes(self, read_item, value) -> None:
            try:
                obj = torch.load(value, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
                self.unsafe = UnsafeCheckpointError(
                    f"refusing to load the sharded checkpoint's item {read_item.dest_index.fqn!r}: it references "
                    f"{found.group(1) if found else 'objects'}, not only tensors and plain data")
                raise self.unsafe from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return Planner


def _read(load, *parts) -> None:
    """Run a DCP load; a refused metadata file or item surfaces as its own one-line error (DCP folds
    reader / planner errors into an AssertionError / CheckpointException message)."""
    try:
        load()
    except BaseException:  # DCP's CheckpointException derives from BaseException
        for part in parts:
            if part.unsafe is not None:
                raise part.unsafe from None
        raise


def load_into(path: str, module, optimizer) -> None:
    """Model and optimizer state from the shards, resharded to this run's layout (any world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(module, optimizer)  # the layout to fill (allocated here)
    state = {"model": model_sd, "optimizer": optim_sd}
    reader, planner = _safe_reader(path), _weights_only_bytes(DefaultLoadPlanner)()
    _read(lambda: dcp.load(state, storage_reader=reader, planner=planner), reader, planner)
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_model_state(path: str) -> dict:
    """The whole model state dict as plain CPU tensors (kfe export / eval), read from the shards."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sd: dict = {}  # as DCP's _load_state_dict_from_keys(keys={"model"}), with the safe reader and planner
    no_dist = not (dist.is_available() and dist.is_initialized())
    reader, planner = _safe_reader(path), _weights_only_bytes(_EmptyStateDictLoadPlanner)(keys={"model"})
    _read(lambda: _load_state_dict(state_dict=sd, storage_reader=reader, no_dist=no_dist, planner=planner),
          reader, planner)
    return dict(sd["model"])
