"""The real `searchengine serve` process on a free loopback port, queried over HTTP."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.inprocess import run_cli
from tests.server import EXE, env_for, get, running_server

pytestmark = pytest.mark.slow  # the real `serve` and `watch` processes


@pytest.mark.dtype
def test_serve_answers_over_http(tmp_path, photo_files, tiny_model_dir):
    folder = tmp_path / "photos"
    folder.mkdir()
    for f in photo_files[:4]:
        (folder / f.name).write_bytes(f.read_bytes())
    env = env_for(tiny_model_dir, tmp_path / "data")
    assert run_cli("index", folder, env=env, clean=False).returncode == 0  # in this process: only serving needs its own
    with running_server(env, tmp_path / "serve.log") as (base, log):
        status, body = get(f"{base}/api/search?q=a+yellow+flower&k=3")
        assert status == 200
        hits = json.loads(body)["hits"]
        assert len(hits) == 3 and all(Path(h["path"]).parent == folder for h in hits)
        status, thumb = get(base + hits[0]["thumbnail_url"])
        assert status == 200 and thumb[:2] == b"\xff\xd8"  # a JPEG
        status, body = get(f"{base}/api/search?q=")
        assert status == 400 and "empty" in json.loads(body)["error"]
        status, page = get(base + "/")
        assert status == 200 and b"/static/app.js" in page
        # A restore under a running server left it answering from the replaced store.
        refused = run_cli("restore", env=env, clean=False)
        assert refused.returncode != 0 and "a server (searchengine serve) has" in refused.stderr, refused.stderr
    restored = run_cli("restore", env=env, clean=False)
    assert restored.returncode == 0, restored.stderr  # the server stopped: restore goes on
    text = (tmp_path / "serve.log").read_text()
    assert "GET /api/search?q=a+yellow+flower&k=3 200" in text  # one line per request
    assert "Traceback" not in text


def test_watch_command_indexes_what_arrives_and_stops_cleanly(tmp_path, photo_files, tiny_model_dir):
    import signal
    import time

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / photo_files[0].name).write_bytes(photo_files[0].read_bytes())
    env = env_for(tiny_model_dir, tmp_path / "data")
    log = open(tmp_path / "watch.log", "w+")
    proc = subprocess.Popen([EXE, "watch", str(folder), "--debounce", "0.3"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "caught up" not in (tmp_path / "watch.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "watch.log").read_text()
            time.sleep(0.1)
        (folder / "arrived.jpg").write_bytes(photo_files[1].read_bytes())
        deadline = time.monotonic() + 90  # generous: CI machines are shared and noisy
        while "searchengine.indexing.watch: 1 indexed, 0 linked" not in (tmp_path / "watch.log").read_text():  # the update, not the catch-up line
            assert time.monotonic() < deadline, (tmp_path / "watch.log").read_text()
            time.sleep(0.1)
        (folder / "broken.jpg").write_bytes(b"this is not a picture")
        while "0 indexed, 0 linked, 0 moved, 0 removed, 1 skipped" not in (tmp_path / "watch.log").read_text():
            assert time.monotonic() < deadline, (tmp_path / "watch.log").read_text()
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    out = run_cli("stats", "--json", env=env, clean=False).stdout
    assert json.loads(out)["images"] == 2
    text = (tmp_path / "watch.log").read_text()
    assert "Traceback" not in text
    # Each file by name, once: the arrival, and the skip with its reason.
    assert f"indexed {folder / 'arrived.jpg'}" in text
    skips = [line for line in text.splitlines() if "broken.jpg" in line]
    assert len(skips) == 1 and "skipping" in skips[0] and "not an image" in skips[0], text


def test_serve_with_watch_makes_new_photos_searchable(tmp_path, photo_files, tiny_model_dir):
    import time

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / photo_files[0].name).write_bytes(photo_files[0].read_bytes())
    env = env_for(tiny_model_dir, tmp_path / "data")
    # `serve --watch` on an index that does not exist yet: the watcher builds it.
    proc_env = {**env, "SEARCHENGINE_REFRESH_INTERVAL_S": "0.2"}
    import tests.server as server

    exe_args = ["--watch", str(folder), "--debounce", "0.3"]
    with server.running_server(proc_env, tmp_path / "serve.log", extra_args=exe_args) as (base, _):
        def paths():
            return {h["path"] for h in json.loads(get(f"{base}/api/search?q=photo&k=50&rerank=false")[1])["hits"]}

        deadline = time.monotonic() + 90  # generous: CI machines are shared and noisy
        while paths() != {str(folder / photo_files[0].name)}:
            assert time.monotonic() < deadline, paths()
            time.sleep(0.2)
        (folder / "new.jpg").write_bytes(photo_files[2].read_bytes())
        deadline = time.monotonic() + 90  # generous: CI machines are shared and noisy
        while str(folder / "new.jpg") not in paths():
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)


def test_a_store_deleted_under_serve_watch_is_neither_read_nor_written(tmp_path, photo_files, tiny_model_dir):
    """`rm store.db*` under `serve --watch`: the routes answered 200 from the deleted file and
    new photos were logged "indexed" into it, lost at exit (issue 27 B.5). Now every use of
    the store says what happened, as a 503, and the watcher indexes nothing into it."""
    import time

    import tests.server as server

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "first.jpg").write_bytes(photo_files[0].read_bytes())
    data = tmp_path / "data"
    env = {**env_for(tiny_model_dir, data), "SEARCHENGINE_REFRESH_INTERVAL_S": "0.2"}
    with server.running_server(env, tmp_path / "serve.log", extra_args=["--watch", str(folder), "--debounce", "0.2"]) as (base, _):
        deadline = time.monotonic() + 90
        while get(f"{base}/api/search?q=photo&rerank=false")[0] != 200 or b"first.jpg" not in get(f"{base}/api/search?q=photo&rerank=false")[1]:
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        for f in data.glob("store.db*"):
            f.unlink()
        status, body = get(f"{base}/api/search?q=photo&rerank=false")
        assert status == 503 and "was deleted while this process had it open" in json.loads(body)["error"], body
        status, body = get(f"{base}/healthz")
        assert status == 503 and b"store.db is missing" in body, body
        (folder / "late.jpg").write_bytes(photo_files[1].read_bytes())
        deadline = time.monotonic() + 30
        while "cannot look at the changes now, 1 waiting: the store " not in (tmp_path / "serve.log").read_text():
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        time.sleep(1)
        log = (tmp_path / "serve.log").read_text()
        assert "indexed " + str(folder / "late.jpg") not in log and log.count("cannot look at the changes now") == 1, log
        assert "Traceback" not in log, log
    assert not any(data.glob("store.db*"))  # nothing made a new, empty store in its place
