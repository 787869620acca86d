"""kill -9 of the real indexer at several moments, then a restart: consistent and complete."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from searchengine.library import Library
from searchengine.library.opening import store_exists
from searchengine.config.settings import Settings
from tests.inprocess import run_cli
from tests.server import EXE, env_for

pytestmark = pytest.mark.slow  # the real indexer process, killed and restarted

N = 48


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "photos"
    (d / "a").mkdir(parents=True)
    (d / "b").mkdir()
    rng = np.random.default_rng(0)
    for i in range(N):
        arr = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=85)
        (d / ("a" if i % 2 else "b") / f"img{i:03d}.jpg").write_bytes(buf.getvalue())
    # Two copies of one content: listed twice, embedded once.
    (d / "b" / "copy-of-img001.jpg").write_bytes((d / "a" / "img001.jpg").read_bytes())
    return d


def start(folder: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([EXE, "index", str(folder)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def rows(settings: Settings) -> int:
    """Files the store has so far (0 while it is not there yet), on either backend."""
    if settings.database_url:
        from sqlalchemy import create_engine, text
        from sqlalchemy.exc import SQLAlchemyError

        engine = create_engine(settings.database_url)
        try:
            with engine.connect() as conn:
                return conn.execute(text("select count(*) from files")).scalar_one()
        except SQLAlchemyError:
            return 0
        finally:
            engine.dispose()
    try:
        with sqlite3.connect(f"file:{settings.store_path}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("select count(*) from files").fetchone()[0]
    except sqlite3.Error:
        return 0


def wait_for(condition, proc, timeout=120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.001)
    return False


def check(settings: Settings, folder: Path, complete: bool) -> None:
    """Store and index agree; every file at most (or, when complete, exactly) once."""
    library = Library.open(settings)  # opening repairs what a crash left
    try:
        store_ids = set(library.store.image_ids().tolist())
        assert set(library.index.ids().tolist()) == store_ids
        assert len(library.index) == len(store_ids)  # no image twice in FAISS
        assert library.features.ids() <= store_ids and library.thumbnails.ids() <= store_ids
        files = library.store.files_under(str(folder))
        on_disk = {str(p) for p in folder.rglob("*.jpg")}
        assert set(files) <= on_disk  # nothing of deleted files
        hashes = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.jpg")}
        for path, state in files.items():
            assert state.status == "indexed"
            assert library.store.image_id_for_hash(hashes[path]) == state.image_id
        if complete:
            assert set(files) == on_disk
            assert len(store_ids) == len(set(hashes.values()))  # each content embedded once
    finally:
        library.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.parametrize("moment", ["early", "mid-batch", "during-index-write"])
def test_kill_9_then_restart_is_consistent_and_complete(folder, tmp_path, tiny_model_dir, moment, backend, request):
    data = tmp_path / "data"
    database_url = request.getfixturevalue("postgres").new_database() if backend == "postgresql" else None
    env = {**env_for(tiny_model_dir, data), "SEARCHENGINE_BATCH_SIZE": "2", "SEARCHENGINE_SAVE_EVERY_S": "0.001"}
    if database_url:
        env["SEARCHENGINE_DATABASE_URL"] = database_url
    settings = Settings(data_dir=data, model=str(tiny_model_dir), database_url=database_url)
    proc = start(folder, env)
    if moment == "early":
        time.sleep(0.5)  # still importing / loading the model
    elif moment == "mid-batch":
        assert wait_for(lambda: rows(settings) >= N // 3, proc), "the indexer never got a third of the way"
    else:  # the FAISS file is being written: its temp file exists
        assert wait_for(lambda: any(data.glob(".vectors.faiss.*.tmp")), proc), "never caught an index write"
    assert proc.poll() is None, "the indexer finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    if store_exists(settings):
        check(settings, folder, complete=False)
    # While it was down, one file went and one came.
    (folder / "a" / "img003.jpg").unlink()
    (folder / "a" / "late.jpg").write_bytes((folder / "b" / "img000.jpg").read_bytes()[:-2] + b"\xff\xd9")

    # The restart: the same command in this process (the kill needed a real one; the repair
    # is the command's, not the interpreter's).
    restart = run_cli("index", folder, env=env, clean=False)
    assert restart.returncode == 0, restart.stderr
    assert "Traceback" not in restart.stderr
    check(settings, folder, complete=True)
