"""The store is no single point of loss: backups, restore, check, and a missing or damaged store
that is reported, never silently replaced by an empty one."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3

import pytest

from searchengine.indexing.pipeline import Indexer
from searchengine.store import backup
from searchengine.errors import StoreDamagedError, StoreMissingError
from searchengine.library import Library
from tests.helpers import wait_healthy
from tests.inprocess import cli  # the real command, in this process


def snapshot(settings) -> dict:
    """Everything the store knows that matters: ids, paths, captions and vectors."""
    library = Library.open(settings)
    try:
        ids = library.store.image_ids()
        records = library.store.images(ids.tolist())
        vectors = {int(i): v.tobytes() for chunk_ids, chunk in library.store.iter_vectors(ids) for i, v in zip(chunk_ids, chunk)}
        return {int(i): (tuple(records[int(i)].paths), records[int(i)].caption, vectors[int(i)]) for i in ids}
    finally:
        library.close()


@pytest.fixture
def indexed(settings, model, tmp_path, photo_files):
    folder = tmp_path / "photos"
    folder.mkdir()
    for f in photo_files[:4]:
        shutil.copy(f, folder / f.name)
    library = Library.open(settings, create=True)
    Indexer(model, library, settings).run([folder])
    made = library.backup()
    library.close()
    return folder, made


def test_a_backup_is_a_sound_copy_and_only_the_newest_are_kept(settings, indexed):
    _, made = indexed
    assert made is not None and backup.integrity_problem(made.path) is None
    library = Library.open(settings.model_copy(update={"backups": 2}))
    try:
        for _ in range(3):
            library.backup()
        kept = library.backups()
    finally:
        library.close()
    assert len(kept) == 2 and all(backup.integrity_problem(b.path) is None for b in kept)
    assert not list(settings.backups_dir.glob(".*.tmp"))


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_missing_or_empty_store_is_refused_and_nothing_is_touched(settings, indexed, damage):
    faiss_before = settings.vectors_path.read_bytes()
    thumbs_before = sorted(p.name for p in settings.thumbnails_dir.rglob("*.jpg"))
    if damage == "delete":
        settings.store_path.unlink()
    else:
        settings.store_path.write_bytes(b"")
    for create in (False, True):  # not even `index` may start a new empty store here
        with pytest.raises(StoreMissingError) as e:
            Library.open(settings, create=create)
        assert "searchengine restore" in str(e.value) and "vectors.faiss" in str(e.value)
    assert settings.vectors_path.read_bytes() == faiss_before  # nothing was wiped to match an empty store
    assert sorted(p.name for p in settings.thumbnails_dir.rglob("*.jpg")) == thumbs_before


def test_a_garbage_store_is_reported_as_damaged_with_the_way_back(settings, indexed):
    size = settings.store_path.stat().st_size
    settings.store_path.write_bytes(os.urandom(size))
    for suffix in ("-wal", "-shm"):
        os.unlink(f"{settings.store_path}{suffix}") if os.path.exists(f"{settings.store_path}{suffix}") else None
    with pytest.raises(StoreDamagedError) as e:
        Library.open(settings)
    assert "damaged" in str(e.value) and "searchengine restore" in str(e.value)


@pytest.mark.parametrize("damage", ["delete", "truncate", "garbage"])
def test_restore_brings_back_everything_indexed_before_the_backup(settings, indexed, damage, photo_files, model):
    folder, _ = indexed
    shutil.copy(photo_files[5], folder / "later.jpg")  # indexed, then backed up again
    library = Library.open(settings)
    Indexer(model, library, settings).run([folder])
    library.backup()
    library.close()
    want = snapshot(settings)
    if damage == "delete":
        settings.store_path.unlink()
    elif damage == "truncate":
        with open(settings.store_path, "r+b") as f:
            f.truncate(settings.store_path.stat().st_size // 2)
    else:
        settings.store_path.write_bytes(b"not a database at all" * 1000)
    chosen = backup.find_backup(settings.store_path, None)
    backup.restore(settings.store_path, chosen)
    assert snapshot(settings) == want  # every id, path, caption and vector
    library = Library.open(settings)
    try:
        assert sorted(library.index.ids().tolist()) == sorted(want)  # the vector index follows the store
    finally:
        library.close()


def test_a_damaged_backup_is_never_restored(settings, indexed):
    _, made = indexed
    made.path.write_bytes(b"garbage")
    before = settings.store_path.read_bytes()
    with pytest.raises(backup.BackupError, match="cannot be restored"):
        backup.restore(settings.store_path, backup.find_backup(settings.store_path, made.name))
    assert settings.store_path.read_bytes() == before


def test_check_reports_each_part_and_changes_nothing(settings, indexed):
    library = Library.open(settings, writable=False)
    try:
        findings = library.check()
    finally:
        library.close()
    assert all(ok for ok, _ in findings), findings
    settings.vectors_path.unlink()
    stale = settings.thumbnails_dir / "3f" / "999999.jpg"  # an image the store does not have
    stale.parent.mkdir(exist_ok=True)
    shutil.copy(next(settings.thumbnails_dir.rglob("*.jpg")), stale)
    library = Library.open(settings, writable=False)
    try:
        findings = dict((what.split(":")[0], ok) for ok, what in library.check())
    finally:
        library.close()
    assert findings[f"vector index {settings.vectors_path}"] is False
    assert findings["thumbnails"] is False
    assert not settings.vectors_path.exists()  # a check repairs nothing


def test_a_store_damaged_under_a_running_server_answers_503(settings, indexed, model):
    from fastapi.testclient import TestClient

    from searchengine.app.api import create_app

    def loader(s):
        return model, Library.open(s)

    with TestClient(create_app(settings, loader=loader)) as client:
        wait_healthy(client)
        assert client.get("/api/search", params={"q": "a photo"}).status_code == 200
        with sqlite3.connect(settings.store_path) as conn:  # every page in the main file, none in the WAL
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = settings.store_path.stat().st_size
        with open(settings.store_path, "r+b") as f:  # overwritten in place, as a failing disk would
            f.write(os.urandom(size))
        health = client.get("/healthz")
        assert health.status_code == 503 and "damaged" in health.json()["error"]
        r = client.get("/api/search", params={"q": "another photo"})
        assert r.status_code == 503 and "searchengine restore" in r.json()["error"], r.text


def test_the_cli_backs_up_after_indexing_and_restores(tmp_path, tiny_model_dir, photo_files):
    folder = tmp_path / "photos"
    folder.mkdir()
    for f in photo_files[:3]:
        shutil.copy(f, folder / f.name)
    env = {"SEARCHENGINE_MODEL": str(tiny_model_dir), "SEARCHENGINE_DATA_DIR": str(tmp_path / "data"),
           "SEARCHENGINE_CAPTIONS": "false"}
    cli("index", folder, env_extra=env, check_rc=0)
    assert "backups      1, newest store-" in cli("stats", env_extra=env, check_rc=0).stdout
    unchanged = cli("index", folder, env_extra=env, check_rc=0)
    assert "0 indexed" in unchanged.stdout
    assert len(json.loads(cli("stats", "--json", env_extra=env, check_rc=0).stdout)["backups"]) == 1  # nothing changed
    assert cli("check", env_extra=env).returncode == 0
    (tmp_path / "data" / "store.db").unlink()
    refused = cli("search", "a photo", env_extra=env)
    assert refused.returncode == 1 and "searchengine restore" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    checked = cli("check", env_extra=env)
    assert checked.returncode == 1 and "missing" in checked.stdout
    restored = cli("restore", env_extra=env, check_rc=0)
    assert restored.stdout.startswith("restored store-") and "3 images" in restored.stdout
    assert len(json.loads(cli("search", "a photo", "--json", env_extra=env, check_rc=0).stdout)["results"]) == 3


def test_backups_are_consistent_while_a_writer_is_busy(settings, indexed):
    """SQLite's online backup copies a consistent state even with a transaction open."""
    conn = sqlite3.connect(settings.store_path)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE meta SET value = value WHERE key = 'revision'")
    try:
        made = backup.make_backup(settings.store_path, 0, keep=5)
    finally:
        conn.rollback()
        conn.close()
    assert backup.integrity_problem(made.path) is None
    count = "SELECT count(*) FROM images"
    with sqlite3.connect(made.path) as a, sqlite3.connect(settings.store_path) as b:
        assert a.execute(count).fetchone() == b.execute(count).fetchone() == (4,)


def test_check_without_a_backup_says_how_to_make_one(settings, indexed):
    for f in settings.backups_dir.glob("*"):
        f.unlink()
    library = Library.open(settings, writable=False)
    try:
        findings = [(ok, what) for ok, what in library.check() if what.startswith("backups")]
    finally:
        library.close()
    assert findings == [(False, "backups: 0; `searchengine backup` makes one now (index and watch make them after a run that changed something)")]
