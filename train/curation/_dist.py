"""The few collectives the curation job needs, over gloo (CPU) under torchrun, no-ops otherwise.

Errors must reach every rank: a rank that fails while the others wait in a collective would hang
the job until the timeout, so each step ends with `check(error)`, which all ranks call and which
raises the first error (by rank) everywhere.
"""
from __future__ import annotations

import datetime
import os

import numpy as np


class Dist:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self._owned = False

    @property
    def active(self) -> bool:
        return self.world > 1

    def init(self) -> None:
        if not self.active:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            # Pass 1 of a large pool can keep ranks apart for hours before the first collective.
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
            self._owned = True

    def close(self) -> None:
        if self._owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owned = False

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
        if not self.active:
            return array
        import torch
        import torch.distributed as dist

        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
        dist.all_reduce(tensor)
        return tensor.numpy()

    def all_gather(self, obj) -> list:
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def on_rank0(self, fn) -> str | None:
        """Run fn on rank 0; its exception becomes the error message that `check` then raises."""
        if self.rank != 0:
            return None
        try:
            fn()
        except (OSError, ValueError) as err:
            return err
        return None

    def check(self, error, cls: type = ValueError) -> None:
        """Collective: raise the first rank's error (an exception, or a message raised as `cls`) on
        every rank; a single process re-raises an exception as it is."""
        if isinstance(error, BaseException) and not self.active:
            raise error
        errors = [e for e in self.all_gather(None if error is None else str(error)) if e is not None]
        if errors:
            raise cls(errors[0])
