"""Reading tar shards without silent losses.

Python's tarfile ends iteration quietly at a missing, short or invalid header: a shard cut at a member
boundary or inside a header reads as a complete, shorter archive. A complete archive ends with a
zero block (tar writers put two, then pad), so after the members we check that one is there.
"""
from __future__ import annotations

import tarfile
from typing import Iterator


def members(tar: tarfile.TarFile, path: str) -> Iterator[tarfile.TarInfo]:
    """Every member of `tar` (opened seekable, mode 'r:*'); raises tarfile.ReadError when the archive
    stops without its end-of-archive block, after yielding the members before the cut."""
    yield from tar
    check_end(tar, path)


def check_end(tar: tarfile.TarFile, path: str) -> None:
    # tarfile leaves `offset` at the header it could not read: the end block of a whole archive
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"{path}: truncated or corrupt tar: no end-of-archive block at byte {tar.offset}"
                                f" (the shard was cut or overwritten after its last complete member)")
