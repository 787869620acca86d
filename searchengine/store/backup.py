"""Backups of the store, the one source of truth: made, listed, checked and restored.

The FAISS index, the ViT features and the thumbnails are derived and rebuilt from the store;
the store alone holds the ids, vectors, captions and paths. So the store is what is backed
up: with SQLite's online backup API (a consistent copy while readers and a writer run),
into `backups/` beside it, written whole (temp file, fsync, rename, fsync of the folder) so a
crash never leaves half a backup under a backup's name. The newest `keep` are kept.

A restore checks the backup (`PRAGMA integrity_check`), then puts a copy in the store's
place the same way, after removing the damaged store's WAL files (SQLite would otherwise
replay them onto the restored file). Opening the library afterwards reconciles the derived
files with it; the next `index` run embeds what was added after the backup.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from searchengine.errors import BackupError
from searchengine.util.durable import fsync_path

_NAME = re.compile(r"^store-(\d{8}T\d{6}\.\d{6})-(\d+)\.db$")


@dataclass(frozen=True)
class Backup:
    path: Path
    taken: str  # UTC, YYYYmmddTHHMMSS.ffffff
    revision: int  # the store's revision when it was taken
    size: int

    @property
    def name(self) -> str:
        return self.path.name


def backups_dir(store_path: Path) -> Path:
    return Path(store_path).parent / "backups"


def list_backups(store_path: Path) -> list[Backup]:
    """Backups of this store, newest first."""
    folder = backups_dir(store_path)
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            out.append(Backup(p, m.group(1), int(m.group(2)), p.stat().st_size))
    return sorted(out, key=lambda b: (b.taken, b.revision, b.name), reverse=True)


def integrity_problem(path: Path) -> str | None:
    """None when `path` is a sound SQLite database holding a store; else what is wrong."""
    if not path.is_file():
        return "no such file"
    if path.stat().st_size == 0:
        return "the file is empty (0 bytes)"
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
            if rows != [("ok",)]:
                return "damaged: " + "; ".join(r[0] for r in rows[:3])
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not {"meta", "images", "files", "vectors"} <= tables:
                return "not a searchengine store (its tables are missing)"
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        return f"not a readable database ({e})"
    return None


def make_backup(store_path: Path, revision: int, keep: int) -> Backup:
    """A consistent copy of the live store in `backups/`; the oldest beyond `keep` go."""
    folder = backups_dir(store_path)
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    taken = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}"
    final = folder / f"store-{taken}-{revision}.db"
    tmp = folder / f".{final.name}.{os.getpid()}.tmp"
    try:
        src = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
        try:
            dst = sqlite3.connect(tmp)
            try:
                src.backup(dst)  # SQLite's online backup: consistent while others read and write
                dst.execute("PRAGMA journal_mode=DELETE")  # a single self-contained file
            finally:
                dst.close()
        finally:
            src.close()
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_path(folder)
    except (OSError, sqlite3.Error) as e:
        tmp.unlink(missing_ok=True)
        raise BackupError(f"cannot back up the store {store_path} to {folder}: {e}") from e
    for old in list_backups(store_path)[max(keep, 1):]:
        old.path.unlink(missing_ok=True)
    return Backup(final, taken, revision, final.stat().st_size)


def find_backup(store_path: Path, name: str | None) -> Backup:
    """The backup named (a file name from `backups/`, or a path), or the newest."""
    backups = list_backups(store_path)
    if name is None:
        if not backups:
            raise BackupError(f"there is no backup in {backups_dir(store_path)}")
        return backups[0]
    for b in backups:
        if name in (b.name, str(b.path)):
            return b
    path = Path(name).expanduser()
    if path.is_file():
        return Backup(path, "", -1, path.stat().st_size)
    known = ", ".join(b.name for b in backups) or "none"
    raise BackupError(f"no backup named {name!r} (backups: {known})")


def restore(store_path: Path, backup: Backup) -> None:
    """Put `backup` in the store's place, whole or not at all. Nothing may have the store open."""
    problem = integrity_problem(backup.path)
    if problem is not None:
        raise BackupError(f"backup {backup.path} cannot be restored: {problem}")
    store_path = Path(store_path)
    tmp = store_path.with_name(f".{store_path.name}.restore.{os.getpid()}.tmp")
    try:
        with open(backup.path, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        fsync_path(tmp)
        for suffix in ("-wal", "-shm", "-journal"):  # the damaged store's, never the backup's
            Path(str(store_path) + suffix).unlink(missing_ok=True)
        os.replace(tmp, store_path)
        fsync_path(store_path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BackupError(f"cannot restore {backup.path} to {store_path}: {e}") from e


