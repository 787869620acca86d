"""The whole product on a PostgreSQL store (`--database`): index, keyword, semantic and hybrid
search, stats, and a second machine's data dir sharing the same database with its own FAISS
index, against a real server that the tests start (tests/pg.py)."""

from __future__ import annotations

import json
import re

import pytest

from tests.inprocess import run_cli

pytestmark = pytest.mark.slow


def _results(r) -> list[tuple[str, float | None]]:
    assert r.returncode == 0, r.stderr
    return [(x["paths"][0] if "paths" in x else x["path"], x.get("itc")) for x in json.loads(r.stdout)["results"]]


def test_index_and_search_on_postgresql_as_on_sqlite(postgres, tiny_model_dir, tiny_captioner_dir, photo_files, tmp_path):
    folder = tmp_path / "photos" / "Holidays"
    folder.mkdir(parents=True)
    for i, f in enumerate(photo_files[:6]):
        (folder / f"beach{i}{f.suffix}").write_bytes(f.read_bytes())
    (folder / "empty.jpg").write_bytes(b"")
    url = postgres.new_database()
    pg = {"SEARCHENGINE_DATA_DIR": str(tmp_path / "pg-data"), "SEARCHENGINE_DATABASE_URL": url}
    lite = {"SEARCHENGINE_DATA_DIR": str(tmp_path / "sqlite-data")}
    for env in (pg, lite):
        r = run_cli("index", folder, "--model", tiny_model_dir, "--caption-model", tiny_captioner_dir, env=env)
        assert r.returncode == 0 and "6 indexed" in r.stdout and "1 skipped" in r.stdout, r.stderr
    assert not (tmp_path / "pg-data" / "store.db").exists()  # the store is the server's
    for query, mode in (("beach3", "keyword"), ("holidays", "keyword"), ("a photo", "semantic"), ("beach a photo", "hybrid")):
        args = ("search", *query.split(), "--mode", mode, "--json", "-k", "10")
        got, want = _results(run_cli(*args, env=pg)), _results(run_cli(*args, env=lite))
        assert [p for p, _ in got] == [p for p, _ in want] and got, (query, mode)
        for (_, a), (_, b) in zip(got, want):
            assert (a is None) == (b is None) and (a is None or abs(a - b) < 1e-5)
    stats = run_cli("stats", env=pg)
    assert stats.returncode == 0 and re.search(r"images +6 \(6 files\)", stats.stdout), stats.stdout
    assert re.search(r"failed +1", stats.stdout)
    # A second machine: its own data dir (FAISS, thumbnails), the same database. Its vector
    # index is built from the store's vectors: the same ITC ranking.
    other = {**pg, "SEARCHENGINE_DATA_DIR": str(tmp_path / "other-machine")}
    args = ("search", "a", "photo", "--mode", "semantic", "--json", "-k", "10", "--no-rerank")
    assert _results(run_cli(*args, env=other)) == _results(run_cli(*args, env=pg))
    assert (tmp_path / "other-machine" / "vectors.faiss").exists()
    # Changes made through one machine reach the other: a file removed and re-indexed.
    (folder / "beach0.jpg").unlink(missing_ok=True)
    for f in folder.glob("beach0*"):
        f.unlink()
    assert run_cli("index", env=pg).returncode == 0
    got = [p for p, _ in _results(run_cli(*args, env=other))]
    assert len(got) == 5 and not any("beach0" in p for p in got)
    restore = run_cli("restore", env=pg)
    assert restore.returncode != 0 and "pg_restore" in restore.stderr


def test_two_indexers_and_a_watcher_share_one_database_at_once(postgres, tiny_model_dir, tmp_path):
    """Three writers on three machines' data dirs, one database, all at once: two `index` runs
    on different folders (a photo in both) and a `watch` that sees a photo arrive. Every file
    ends indexed, every content once, and a fourth data dir reads it all."""
    import io
    import signal
    import subprocess
    import time

    import numpy as np
    from PIL import Image

    from tests.server import EXE, env_for

    rng = np.random.default_rng(3)

    def jpeg() -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG", quality=85)
        return buf.getvalue()

    folders = {name: tmp_path / name for name in ("a", "b", "c")}
    for f in folders.values():
        f.mkdir()
    for i in range(12):
        (folders["a"] / f"a{i}.jpg").write_bytes(jpeg())
        (folders["b"] / f"b{i}.jpg").write_bytes(jpeg())
    (folders["b"] / "same-as-a0.jpg").write_bytes((folders["a"] / "a0.jpg").read_bytes())
    (folders["c"] / "c0.jpg").write_bytes(jpeg())
    url = postgres.new_database()
    # The schema is made once up front (as a first `index` on the server would): three
    # processes creating it at the same moment is not a case this test is about.
    first = run_cli("index", folders["c"], "--model", tiny_model_dir, "--no-captions",
                    env={"SEARCHENGINE_DATA_DIR": str(tmp_path / "d0"), "SEARCHENGINE_DATABASE_URL": url})
    assert first.returncode == 0, first.stderr

    def env(name):
        return {**env_for(tiny_model_dir, tmp_path / f"data-{name}"), "SEARCHENGINE_DATABASE_URL": url, "SEARCHENGINE_BATCH_SIZE": "2"}

    watch_log = tmp_path / "watch.log"
    with open(watch_log, "w+") as log:
        watcher = subprocess.Popen([EXE, "watch", str(folders["c"]), "--debounce", "0.3"], env=env("c"), stdout=log, stderr=subprocess.STDOUT)
        try:
            indexers = [subprocess.Popen([EXE, "index", str(folders[n])], env=env(n), stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True) for n in ("a", "b")]
            deadline = time.monotonic() + 120
            while "caught up" not in watch_log.read_text():
                assert watcher.poll() is None and time.monotonic() < deadline, watch_log.read_text()
                time.sleep(0.1)
            (folders["c"] / "c1.jpg").write_bytes(jpeg())  # arrives while the indexers run
            outs = [p.communicate(timeout=300) for p in indexers]
            for p, (out, err) in zip(indexers, outs):
                assert p.returncode == 0 and "Traceback" not in err, err
            while "1 indexed" not in watch_log.read_text():
                assert time.monotonic() < deadline + 60, watch_log.read_text()
                time.sleep(0.1)
        finally:
            watcher.send_signal(signal.SIGTERM)
            assert watcher.wait(timeout=30) == 0
    assert "Traceback" not in watch_log.read_text()
    stats = json.loads(run_cli("stats", "--json", env={"SEARCHENGINE_DATA_DIR": str(tmp_path / "reader"),
                                                      "SEARCHENGINE_DATABASE_URL": url}).stdout)
    assert stats["files"] == 12 + 13 + 2 and stats["images"] == 12 + 12 + 2  # the shared photo once
    assert stats["failed"] == 0


def test_postgresql_down_is_a_503_to_retry_and_one_line_from_the_cli(tmp_path, model, tiny_model_dir, photo_files):
    """PostgreSQL killed: data routes answered a generic 500 and `index` died with a raw
    "OperationalError: consuming input failed". Now: a 503 with the reason and Retry-After on
    every route, one line from the CLI, and answers again as soon as the server is back."""
    import shutil as sh

    from fastapi.testclient import TestClient

    from searchengine.indexing.pipeline import Indexer
    from searchengine.app.api import create_app
    from searchengine.library import Library
    from searchengine.config.settings import Settings
    from tests.helpers import wait_healthy
    from tests.inprocess import run_cli
    from tests.pg import Server

    server = Server()
    try:
        url = server.new_database()
        folder = tmp_path / "photos"
        folder.mkdir()
        for f in photo_files[:2]:
            sh.copy(f, folder / f.name)
        settings = Settings(data_dir=tmp_path / "data", model=str(tiny_model_dir), device="cpu", dtype="float32",
                            database_url=url, captions=False, refresh_interval_s=0)
        library = Library.open(settings, create=True)
        Indexer(model, library, settings).run([folder])
        library.close()
        env = {"SEARCHENGINE_DATA_DIR": str(settings.data_dir), "SEARCHENGINE_DATABASE_URL": url}
        with TestClient(create_app(settings, loader=lambda s: (model, Library.open(s)))) as client:
            wait_healthy(client)
            assert client.get("/api/search", params={"q": "photo", "mode": "keyword"}).status_code == 200
            server.kill()
            for path, params in (("/api/search", {"q": "photo", "mode": "keyword"}), ("/api/images/1", {}),
                                 ("/api/folders", {}), ("/api/stats", {})):
                r = client.get(path, params=params)
                assert r.status_code == 503 and r.headers.get("retry-after") == "2", (path, r.status_code, r.text)
                assert "the index store cannot be reached" in r.json()["error"], r.text
            cli = run_cli("index", folder, env=env)  # refused at the start, as before, in one line
            assert cli.returncode != 0 and cli.stderr.count("\n") == 1 and "cannot reach the database" in cli.stderr
            server.start()
            r = client.get("/api/search", params={"q": "photo", "mode": "keyword"})
            assert r.status_code == 200, r.text  # the pool reconnects: no restart needed
    finally:
        server.stop()


def test_a_store_lost_mid_command_is_one_line_from_the_cli(monkeypatch, tmp_path):
    """PostgreSQL killed while `index` writes: it died with a raw traceback's last line
    (`OperationalError: consuming input failed`)."""
    from sqlalchemy.exc import OperationalError

    from searchengine.app import cli

    def lost(args, out, err):
        raise OperationalError("INSERT INTO images ...", {}, Exception("consuming input failed: server closed the connection unexpectedly"))

    monkeypatch.setitem(cli.COMMANDS, "stats", lost)
    monkeypatch.setenv("SEARCHENGINE_DATABASE_URL", "postgresql+psycopg://someone:hunter2@db.example/photos")
    import io

    err = io.StringIO()
    assert cli.main(["stats", "--data-dir", str(tmp_path)], out=io.StringIO(), err=err) == cli.EXIT_ERROR
    assert err.getvalue() == (
        "searchengine: error: the index store (postgresql+psycopg://someone:***@db.example/photos) cannot be reached "
        "(consuming input failed: server closed the connection unexpectedly); what was committed before is kept: "
        "run the command again once it is back\n"
    )
