"""Writes that survive a crash, written once for the whole engine: a file replaced whole
(written aside, fsynced, renamed over, the folder fsynced), fsync of a file or a folder, and
whether a folder's disk is full (FAISS and SQLite report a full disk in words of their own)."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path
from typing import Callable


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file, or a folder (so that a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_full(folder: str | os.PathLike, need: int = 1 << 20) -> bool:
    """Less than `need` bytes (1 MiB) left for this user on `folder`'s file system; False
    where that cannot be told."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < need


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None], *, fsync: bool = True) -> None:
    """`write(tmp)` beside `path`, then rename it over `path`: a crash leaves the old file or
    the new one, never half of one, and a failed write leaves no temporary behind. With
    `fsync` (files the index cannot do without) the data and the rename are made durable; a
    cache, remade when missing, goes without. A RuntimeError on a full disk (FAISS reports
    it as a C++ assertion) becomes the OSError it is."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(tmp)
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, RuntimeError) and disk_full(path.parent):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise
    if fsync:
        fsync_path(path.parent)


def write_json(path: str | os.PathLike, obj) -> None:
    """`obj` as JSON, replacing `path` whole and durably."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))
