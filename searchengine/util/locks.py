"""Who may have a data dir open: one indexing writer at a time, any number of servers, and
`restore` only with no server. Each is an flock on a file in the data dir, so it goes with
the process however it ends. This module imports nothing heavy: the entry point asks
`busy_writer` before the CLI's imports, so a second indexer is refused in a tenth of a
second rather than after SQLAlchemy, numpy and pydantic have loaded."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from searchengine.errors import IndexBusyError

WRITER_LOCK = "writer.lock"
# The commands that take it (and `serve --watch`): the CLI and the entry point read this list.
WRITERS = ("index", "watch", "caption", "restore", "reindex")
SERVING_LOCK = "serving.lock"


def _busy_message(data_dir: Path, fd: int) -> str:
    holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
    return f"another indexer is running on {data_dir} ({holder}); wait for it to finish, or stop it first"


def busy_writer(data_dir: str | os.PathLike) -> str | None:
    """The refusal `writer_lock` would give, if an indexer holds the data dir now; else None
    (also when there is no data dir or lock file yet). Takes no lock and creates nothing: the
    command takes the lock itself later, so this is only the early, cheap answer."""
    data_dir = Path(data_dir)
    try:
        fd = os.open(data_dir / WRITER_LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _busy_message(data_dir, fd)
        except OSError:
            return None
        return None
    finally:
        os.close(fd)  # releases a lock taken here


@contextmanager
def writer_lock(data_dir: str | os.PathLike, command: str) -> Iterator[None]:
    """One indexing writer per data dir (index, watch, serve --watch, caption, restore,
    reindex): a second one is refused at once with who holds the lock, rather than racing
    the first and dying on a raw IntegrityError. The data dir must exist: only the commands
    that make an index make it (see the CLI)."""
    data_dir = Path(data_dir)
    fd = os.open(data_dir / WRITER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexBusyError(_busy_message(data_dir, fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: searchengine {command}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def serving_lock(data_dir: str | os.PathLike) -> int | None:
    """Mark the data dir as served by this process, for as long as it runs: a shared flock on
    `serving.lock` (any number of servers), which `restore` asks for exclusively
    (`no_server`). The descriptor, or None where the data dir cannot be written (a
    read-only index, which nothing restores into)."""
    try:
        fd = os.open(Path(data_dir) / SERVING_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


@contextmanager
def no_server(data_dir: str | os.PathLike, command: str) -> Iterator[None]:
    """Refuse at once while a server has the data dir open (`serving_lock`), and keep one from
    opening it until the block is done: a server answers from the store it opened, so one
    running across a restore kept answering from the replaced file (deleted files returned,
    new ones missed, /healthz 200) until it was restarted."""
    fd = os.open(Path(data_dir) / SERVING_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexBusyError(
                f"a server (searchengine serve) has {data_dir} open: stop it, {command}, then start it again "
                "(it would go on answering from the store it opened)"
            ) from None
        yield
    finally:
        os.close(fd)
