"""Finding and opening a data directory's store: whether there is one, whether it can be
written, and the store opened read-write or read-only."""

from __future__ import annotations

import os
from pathlib import Path

from searchengine.config.settings import Settings
from searchengine.errors import SearchEngineError, StoreDamagedError, StoreMissingError
from searchengine.store import backup
from searchengine.store.connection import sqlite_readonly_url, sqlite_url
from searchengine.store.writes import Store


def unwritable_path(settings: Settings) -> Path | None:
    """The first part of the data directory this process cannot write, or None.

    The data directory itself (new files and renames happen there), then the store and its WAL
    files where they exist. A data directory that does not exist yet counts as its nearest
    existing parent, which must let it be created. os.access also sees a read-only mount
    (EROFS) and immutable files, which a permission check alone would miss when run as root.
    """
    data_dir = Path(settings.data_dir).expanduser().absolute()
    if not data_dir.exists():
        parent = data_dir.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        return None if os.access(parent, os.W_OK | os.X_OK) else parent
    if not os.access(data_dir, os.W_OK | os.X_OK):
        return data_dir
    store = settings.store_path
    store_files = () if settings.database_url else (store, Path(f"{store}-wal"), Path(f"{store}-shm"))
    for path in (*store_files, settings.vectors_path, settings.ann_manifest_path):
        if path.exists() and not os.access(path, os.W_OK):
            return path
    return None


def open_store(settings: Settings, *, read_only: bool, no_room: bool = False) -> Store:
    """The store, or StoreDamagedError that says how to get it back."""
    if settings.database_url:  # a database server: its own durability, no backups of ours
        return Store.open(settings.database_url, read_only=read_only, location=settings.store_location)
    try:
        if read_only:
            url = sqlite_readonly_url(settings.store_path, no_room=no_room)
            return Store.open(url, read_only=True, location=str(settings.store_path))
        return Store.open(sqlite_url(settings.store_path), location=str(settings.store_path))
    except StoreDamagedError as e:
        backups = backup.list_backups(settings.store_path)
        way = (
            f"`searchengine restore` puts back the newest backup ({backups[0].name}); `searchengine check` says more"
            if backups else "there is no backup to restore; re-index into another --data-dir"
        )
        raise StoreDamagedError(f"{e}. {way}") from e


def index_traces(settings: Settings) -> list[str]:
    """What in the data dir shows that an index was there (besides the store)."""
    traces = []
    for path in (settings.vectors_path, settings.ann_manifest_path):
        if path.exists():
            traces.append(path.name)
    for folder in (settings.backups_dir, settings.features_dir, settings.thumbnails_dir, settings.previews_dir):
        if folder.is_dir() and any(folder.iterdir()):
            traces.append(folder.name + "/")
    return traces


def store_exists(settings: Settings) -> bool:
    """Whether there is an index's store: the SQLite file, or an index's tables in the database."""
    if not settings.database_url:
        return settings.store_path.exists()
    from sqlalchemy import create_engine, inspect

    engine = create_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            return inspect(conn).has_table("meta")
    except Exception as e:  # noqa: BLE001 - a server that cannot be reached, in its own words
        said = str(getattr(e, "orig", None) or e).strip().splitlines()
        raise SearchEngineError(f"cannot reach the database {settings.store_location}: {said[0] if said else type(e).__name__}") from None
    finally:
        engine.dispose()


def check_store_present(settings: Settings) -> None:
    """StoreMissingError where the store is gone (or empty) but an index was there: a new empty
    store would silently lose every id, vector and caption, and reconciling would then wipe
    the derived files to match it. Never replace it: say what is missing and how to get it back."""
    if settings.database_url:
        return  # the database server keeps the store; an empty database is a new index
    store = settings.store_path
    missing = not store.exists() or store.stat().st_size == 0
    traces = index_traces(settings) if missing else []
    if not traces:
        return
    what = "is missing" if not store.exists() else "is empty (0 bytes)"
    backups = backup.list_backups(store)
    way = (
        f"`searchengine restore` puts back the newest backup ({backups[0].name}, of {len(backups)})"
        if backups else "there is no backup to restore; re-index into another --data-dir"
    )
    raise StoreMissingError(
        f"the store {store} {what}, but {settings.data_dir} holds an index ({', '.join(traces)}): {way}. "
        "Nothing was changed"
    )
