"""Connecting to a store: SQLite URLs and pragmas (read-write and read-only), holding a SQLite
file to its path, and reading a database error (damage, an unreachable server)."""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import Engine, URL
from sqlalchemy.exc import DatabaseError

from searchengine.errors import StoreMissingError


def sqlite_url(path: Path) -> URL:
    """The URL of an SQLite file, built rather than written: as text, a `?` or `#` in a
    folder's name began a query string, and the store went to a path cut short there."""
    return URL.create("sqlite", database=str(path))


def sqlite_readonly_url(path: Path, *, no_room: bool = False) -> URL:
    """A URL that opens `path` for reading only, never creating or changing a file.

    A WAL reader normally creates the -shm file next to the database. Where the folder cannot
    be written and no -shm exists (a backup copy, a read-only mount of a cleanly closed
    index), SQLite could not open it at all; `immutable=1` tells it nothing will change the
    file meanwhile, so it reads without the shared memory file. Where -wal and -shm exist,
    they are read as they are (committed transactions still in the WAL count).
    """
    path = Path(path).absolute()
    query = {"mode": "ro", "uri": "true"}
    side_files = [Path(f"{path}-wal"), Path(f"{path}-shm")]
    if not any(p.exists() for p in side_files) and not os.access(path.parent, os.W_OK):
        query["immutable"] = "1"
    # `no_room` (a full disk): the shared memory file cannot grow; where the WAL holds nothing
    # the main file is the whole index, and is read as it is.
    wal = side_files[0]
    if no_room and (not wal.exists() or wal.stat().st_size == 0):
        query["immutable"] = "1"
    # The path is percent-encoded: SQLite decodes it, and a '?' or '#' in a folder name would
    # otherwise end the file name.
    return URL.create("sqlite", database="file:" + urllib.parse.quote(str(path)), query=query)


def sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    # WAL: readers never block the writer. synchronous=NORMAL is safe against a killed
    # process (the case the crash tests cover); FULL would add an fsync per commit.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def sqlite_readonly_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    # No journal_mode: setting it is a write. query_only turns any write that slips through
    # into an error here rather than a surprise on a mount that happens to be writable.
    cur.execute("PRAGMA query_only=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def damage(e: BaseException) -> str:
    """What SQLite said about a damaged file, in its own words (first line, no SQL)."""
    orig = getattr(e, "orig", None) or e
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


def is_damage(e: BaseException) -> bool:
    """A database error that says the file is not (any more) a sound database."""
    text = damage(e).lower()
    return isinstance(e, DatabaseError) and any(
        w in text for w in ("malformed", "not a database", "database disk image", "file is encrypted")
    )


def is_unreachable(e: BaseException) -> bool:
    """A database error that says the store cannot be reached now (a database server down or
    restarting, a dropped connection, a file on a disk that went away), not that a request
    was wrong: retried, it may well work."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    if not isinstance(e, (OperationalError, InterfaceError)) or is_damage(e):
        return False
    text = damage(e).lower()
    return not any(w in text for w in ("syntax error", "no such table", "no such column", "database is locked"))


def hold_to_file(engine: Engine, path: Path) -> None:
    """Tie the engine to the SQLite file it opened: each time a connection is taken, the
    path must still name that file (device and inode). A store deleted (`rm store.db*`) or
    replaced under a running server was read and written through its old, unlinked file:
    deleted photos still returned, new ones logged "indexed" and lost at exit. Now each use
    after that raises StoreMissingError, which the API answers 503 and /healthz reports,
    and which the watcher keeps retrying rather than losing its files."""
    st = os.stat(path)
    opened = (st.st_dev, st.st_ino)

    def check() -> None:
        try:
            now = os.stat(path)
            what = None if (now.st_dev, now.st_ino) == opened else "was replaced by another file"
        except FileNotFoundError:
            what = "was deleted"
        except OSError:
            return  # an unreadable folder: the database's own error says more
        if what is not None:
            raise StoreMissingError(
                f"the store {path} {what} while this process had it open: nothing more is read from or written to the "
                "file it had. Restart this process to open what is there now (`searchengine restore` puts back the "
                "newest backup if the store was deleted)"
            )

    def connect(dialect, record, cargs, cparams) -> None:
        check()
        if cargs and cargs[0] == str(path):  # never make a new, empty file where the store was
            cargs[0] = "file:" + urllib.parse.quote(str(path)) + "?mode=rw"
            cparams["uri"] = True

    event.listen(engine, "do_connect", connect)  # a new connection (its file could reuse the inode number)
    event.listen(engine, "checkout", lambda *a: check())  # one from the pool, open on the file it had
