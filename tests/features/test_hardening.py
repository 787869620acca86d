"""Hardening: one indexer per data dir, and files served only while they are what was indexed."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from fastapi.testclient import TestClient

from searchengine.indexing.pipeline import Indexer
from searchengine.app.api import create_app
from searchengine.library import Library
from searchengine.util.locks import writer_lock
from tests.helpers import fill_disk, wait_healthy
from tests.inprocess import cli  # the real command, in this process

pytestmark = pytest.mark.slow  # real processes, mounts and waits


def test_a_second_indexer_on_the_same_data_dir_is_refused_in_one_line(tmp_path, settings, photo_files):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(photo_files[0], folder / "a.jpg")
    env = {"SEARCHENGINE_MODEL": settings.model, "SEARCHENGINE_DATA_DIR": str(settings.data_dir),
           "SEARCHENGINE_CAPTIONS": "false"}
    settings.data_dir.mkdir(parents=True)
    with writer_lock(settings.data_dir, "watch ~/Pictures"):
        for args in (["index", folder], ["caption", "--caption-model", "x"], ["restore"]):
            proc = cli(*args, env_extra=env)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 1 and len(lines) == 1, proc.stderr
            assert "another indexer is running" in lines[0] and "searchengine watch ~/Pictures" in lines[0]
        assert cli("stats", env_extra=env).returncode == 1  # readers are not locked out ("no index" here)
    assert "1 indexed" in cli("index", folder, env_extra=env, check_rc=0).stdout  # free again


def test_a_file_that_changed_or_a_link_pointed_elsewhere_is_never_served(settings, model, tmp_path, photo_files):
    # Links may lead anywhere here (--links all): only the content check stands in the way.
    settings = settings.model_copy(update={"links": "all"})
    folder = tmp_path / "photos"
    folder.mkdir()
    real = tmp_path / "elsewhere.jpg"
    shutil.copy(photo_files[0], real)
    (folder / "linked.jpg").symlink_to(real)
    shutil.copy(photo_files[1], folder / "edited.jpg")
    library = Library.open(settings, create=True)
    Indexer(model, library, settings).run([folder])
    ids = {os.path.basename(p): s.image_id for p, s in library.store.files_under(str(folder)).items()}
    library.close()
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2\n")

    with TestClient(create_app(settings, loader=lambda s: (model, Library.open(s)))) as client:
        wait_healthy(client)
        linked, edited = ids["linked.jpg"], ids["edited.jpg"]
        assert client.get(f"/api/images/{linked}/file").content == real.read_bytes()
        (folder / "linked.jpg").unlink()
        (folder / "linked.jpg").symlink_to(secret)  # re-pointed after indexing
        with open(folder / "edited.jpg", "ab") as f:  # changed since it was indexed
            f.write(b"\0" * 100)
        for image_id in (linked, edited):
            for what in ("file", "preview"):
                r = client.get(f"/api/images/{image_id}/{what}")
                assert r.status_code == 404 and "indexed content" in r.json()["error"], r.text
                assert b"hunter2" not in r.content


def test_a_full_disk_is_one_clear_line_and_reading_goes_on(tmp_path, settings):
    import subprocess

    import numpy as np
    import pytest
    from PIL import Image

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], check=True)
    try:
        folder = tmp_path / "photos"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(4):
            Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(folder / f"first_{i}.jpg")
        env = {"SEARCHENGINE_MODEL": settings.model, "SEARCHENGINE_DATA_DIR": str(disk / "data"),
               "SEARCHENGINE_CAPTIONS": "false", "SEARCHENGINE_BACKUPS": "0"}
        cli("index", folder, env_extra=env, check_rc=0)
        fill_disk(disk / "filler")
        for i in range(40):  # noisy, so that thumbnails and features need room
            Image.fromarray((rng.random((160, 160, 3)) * 255).astype(np.uint8)).save(folder / f"more_{i:02d}.png")
        full = cli("index", folder, env_extra=env)
        lines = full.stderr.strip().splitlines()
        assert full.returncode == 1 and lines[-1].startswith("searchengine: error: the disk holding the index is full")
        assert "Traceback" not in full.stderr and "assert" not in full.stderr.lower() and "close error" not in full.stderr
        assert not list((disk / "data").rglob("*.tmp"))  # nothing half-written left behind
        # Reading goes on while the disk is full.
        assert "images       " in cli("stats", env_extra=env, check_rc=0).stdout
        assert cli("search", "first", "--mode", "keyword", env_extra=env, check_rc=0).stdout
        assert cli("search", "a photo", "--no-rerank", env_extra=env, check_rc=0).stdout
        (disk / "filler").unlink()
        again = cli("index", folder, env_extra=env, check_rc=0)
        assert "0 skipped" in again.stdout
        import json

        assert json.loads(cli("stats", "--json", env_extra=env, check_rc=0).stdout)["images"] == 44
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_temporary_files_of_a_dead_process_are_swept_on_open(settings, model):
    library = Library.open(settings, create=True)
    library.close()
    stale = settings.thumbnails_dir / "07" / ".7.jpg.999999999.1.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a thumbnail")
    mine = settings.thumbnails_dir / "07" / f".8.jpg.{os.getpid()}.1.tmp"  # a live writer's, in flight
    mine.write_bytes(b"being written")
    top = settings.data_dir / ".vectors.faiss.999999999.tmp"
    top.write_bytes(b"half an index")
    from searchengine.library import model_info

    library = Library.open(settings)
    library.bind(model_info(model))
    library.close()
    assert not stale.exists() and not top.exists() and mine.exists()


@pytest.mark.dtype
def test_a_name_that_is_not_utf8_is_skipped_and_the_run_goes_on(tmp_path, settings, model, photo_files):
    from searchengine.indexing.watch import Watcher
    from tests.indexing.test_watch import wait_until

    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(photo_files[0], folder / "good.jpg")
    bad = os.path.join(os.fsencode(folder), b"bad\xff.jpg")  # Latin-1 bytes from an old camera or disk
    shutil.copy(photo_files[1], bad)
    env = {"SEARCHENGINE_MODEL": settings.model, "SEARCHENGINE_DATA_DIR": str(settings.data_dir),
           "SEARCHENGINE_CAPTIONS": "false"}
    proc = cli("index", folder, env_extra=env, check_rc=0)
    assert proc.stdout.startswith("1 indexed") and "1 skipped (bad_name: 1)" in proc.stdout
    assert f"skipping {folder}/bad\\xff.jpg: the file name is not valid UTF-8" in proc.stderr
    assert "Traceback" not in proc.stderr
    # Listed by stats, with its bytes escaped (it was counted by index, and listed nowhere).
    stats = json.loads(cli("stats", "--json", env_extra=env, check_rc=0).stdout)
    assert stats["failures_by_reason"] == {"bad_name": 1}
    assert [(f["path"], f["reason"]) for f in stats["failures"]] == [(f"{folder}/bad\\xff.jpg", "bad_name")]
    assert "1 unchanged" in cli("index", folder, env_extra=env, check_rc=0).stdout  # recorded once
    os.rename(bad, folder / "renamed.jpg")
    assert "1 indexed" in cli("index", folder, env_extra=env, check_rc=0).stdout
    assert json.loads(cli("stats", "--json", env_extra=env, check_rc=0).stdout)["failed"] == 0    # The watcher: a bad name arriving is skipped, and the next good file is still indexed.
    library = Library.open(settings)
    watcher = Watcher(Indexer(model, library, settings), [folder], debounce_s=0.3)
    watcher.start()
    try:
        shutil.copy(photo_files[2], os.path.join(os.fsencode(folder), b"also\xfe.jpg"))
        shutil.copy(photo_files[3], folder / "later.jpg")
        wait_until(lambda: str(folder / "later.jpg") in library.store.files_under(str(folder)), "the good file indexed")
        assert watcher.health() is None
    finally:
        watcher.stop()
        library.close()


def test_search_paths_never_split_a_name_or_reach_the_terminal_raw(tmp_path, settings, model, photo_files):
    """A newline in a name split it in two under `search -f`, and ESC sequences reached the
    terminal. -f and the table escape control characters; -0 gives the names as they are."""
    folder = tmp_path / "photos"
    folder.mkdir()
    odd = folder / "two\nlines\x1b[31mred.jpg"
    shutil.copy(photo_files[0], odd)
    env = {"SEARCHENGINE_MODEL": settings.model, "SEARCHENGINE_DATA_DIR": str(settings.data_dir),
           "SEARCHENGINE_CAPTIONS": "false"}
    cli("index", folder, env_extra=env, check_rc=0)
    lines = cli("search", "red", "-f", "--no-rerank", env_extra=env, check_rc=0).stdout.splitlines()
    assert lines == [f"{folder}/two\\nlines\\x1b[31mred.jpg"]
    table = cli("search", "red", "--no-rerank", env_extra=env, check_rc=0).stdout
    assert "\x1b" not in table and "two\\nlines\\x1b[31mred.jpg" in table
    nul = cli("search", "red", "-0", "--no-rerank", env_extra=env, check_rc=0).stdout
    assert nul == str(odd) + "\0"
    assert json.loads(cli("search", "red", "--json", "--no-rerank", env_extra=env, check_rc=0).stdout)["results"][0]["path"] == str(odd)


def test_files_that_block_never_hold_up_searches(settings, model, tmp_path, photo_files):
    import threading

    folder = tmp_path / "photos"
    folder.mkdir()
    for f in photo_files[:3]:
        shutil.copy(f, folder / f.name)
    library = Library.open(settings, create=True)
    Indexer(model, library, settings).run([folder])
    library.close()
    settings = settings.model_copy(update={"file_read_timeout_s": 1.0, "file_workers": 2})
    app = create_app(settings, loader=lambda s: (model, Library.open(s)))
    release = threading.Event()
    with TestClient(app) as client:
        wait_healthy(client)
        service = app.state.searchengine.service

        def hung(image_id):  # a FIFO, a hung network mount: a read that does not return
            release.wait(60)
            raise AssertionError("released")

        service.thumbnail = hung
        answers: list[int] = []
        readers = [threading.Thread(target=lambda: answers.append(client.get("/api/images/1/thumbnail").status_code))
                   for _ in range(8)]
        for t in readers:
            t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        r = client.get("/api/search", params={"q": "a photo", "rerank": "false"})
        assert r.status_code == 200 and time.monotonic() - t0 < 5
        for t in readers:
            t.join(timeout=30)
        assert answers == [504] * 8
        release.set()


def _rss_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(field)


def test_a_burst_of_large_uploads_takes_turns_and_gives_memory_back(settings, model, tmp_path, photo_files):
    import io
    import threading

    from PIL import Image

    from searchengine.service import release_memory

    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(photo_files[0], folder / "a.jpg")
    library = Library.open(settings, create=True)
    Indexer(model, library, settings).run([folder])
    library.close()
    buf = io.BytesIO()
    Image.new("RGB", (7000, 7000), (90, 140, 60)).save(buf, "PNG")  # 49 MP, a few hundred KB
    png = buf.getvalue()
    release_memory()
    app = create_app(settings.model_copy(update={"upload_queue": 8}), loader=lambda s: (model, Library.open(s)))
    with TestClient(app) as client:
        wait_healthy(client)
        client.post("/api/search/image", files={"image": ("g.png", png, "image/png")})  # warm up
        release_memory()
        base = _rss_mib()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak RSS counts from here
        statuses: list[int] = []
        burst = [threading.Thread(target=lambda: statuses.append(
            client.post("/api/search/image", files={"image": ("g.png", png, "image/png")}).status_code)) for _ in range(4)]
        for t in burst:
            t.start()
        for t in burst:
            t.join(timeout=300)
        peak, after = _rss_mib("VmHWM") - base, _rss_mib() - base
        print(f"4 concurrent 49 MP uploads: peak +{peak:.0f} MiB, after +{after:.0f} MiB")
        assert statuses == [200] * 4
        assert peak < 800, peak  # one decode at a time (~350-550 MiB), not four (+1.3 GiB before)
        assert after < 120, after  # given back (1 GiB kept before)

    busy = create_app(settings.model_copy(update={"upload_queue": 0}), loader=lambda s: (model, Library.open(s)))
    with TestClient(busy) as client:
        wait_healthy(client)
        answers = []
        burst = [threading.Thread(target=lambda: answers.append(
            client.post("/api/search/image", files={"image": ("g.png", png, "image/png")}))) for _ in range(3)]
        for t in burst:
            t.start()
        for t in burst:
            t.join(timeout=300)
        refused = [r for r in answers if r.status_code == 503]
        assert refused and all(r.headers["retry-after"] == "2" for r in refused)
        assert any(r.status_code == 200 for r in answers)


def test_search_by_a_file_that_does_not_exist_says_so(tmp_path, settings):
    """It said "file vanished before it could be read" of a file that never was."""
    env = {"SEARCHENGINE_MODEL": settings.model, "SEARCHENGINE_DATA_DIR": str(tmp_path / "data")}
    r = cli("search", "--image", tmp_path / "nope.jpg", env_extra=env)
    assert r.returncode != 0 and f"cannot search by {tmp_path / 'nope.jpg'}: there is no such file" in r.stderr
    assert "vanished" not in r.stderr and "Traceback" not in r.stderr


def _ids(settings, folder) -> dict[str, int]:
    library = Library.open(settings)
    try:
        return {os.path.basename(p): s.image_id for p, s in library.store.files_under(str(folder)).items() if s.status == "indexed"}
    finally:
        library.close()


def test_an_unmounted_folder_is_absent_not_empty(tmp_path, settings, photo_files, monkeypatch):
    """Unmounting a disk leaves its mount point an empty folder: `index` read it as every photo
    deleted ("20 removed"), and the remount brought them back with new ids, captioned again."""
    folder, away = tmp_path / "disk", tmp_path / "away"
    folder.mkdir(), away.mkdir()
    for f in photo_files[:3]:
        shutil.copy(f, folder / f.name)
    env = {"SEARCHENGINE_MODEL": settings.model, "SEARCHENGINE_DATA_DIR": str(settings.data_dir),
           "SEARCHENGINE_CAPTIONS": "false"}
    cli("index", folder, env_extra=env, check_rc=0)
    before = _ids(settings, folder)
    for f in folder.iterdir():  # "unmounted": an empty folder where the photos were
        f.rename(away / f.name)
    r = cli("index", env_extra=env, check_rc=0)
    assert "0 removed" in r.stdout and "3 kept (their folder is absent: --prune drops them)" in r.stdout, r.stdout
    assert f"folder {folder} is empty now (an unmounted disk?)" in r.stderr
    assert _ids(settings, folder) == before
    for f in away.iterdir():  # mounted again: the same images, ids and all, nothing embedded
        f.rename(folder / f.name)
    r = cli("index", env_extra=env, check_rc=0)
    assert r.stdout.startswith("0 indexed") and "3 unchanged" in r.stdout and _ids(settings, folder) == before
    # A folder that was a mount point and is one no more is absent even with a stray file in it.
    import searchengine.indexing.pipeline as pipeline

    mounted = {str(folder.resolve())}
    monkeypatch.setattr(pipeline.os.path, "ismount", lambda p: str(p) in mounted)
    cli("index", env_extra=env, check_rc=0)  # recorded as a mount point
    for f in list(folder.iterdir()):
        f.rename(away / f.name)
    (folder / "stray.txt").write_text("left on the parent disk")
    mounted.clear()
    r = cli("index", env_extra=env, check_rc=0)
    assert f"folder {folder} was a mount point and is not one now (unmounted?)" in r.stderr and "0 removed" in r.stdout
    assert _ids(settings, folder) == before
    # Dropping it on purpose.
    r = cli("index", "--prune", env_extra=env, check_rc=0)
    assert "3 removed" in r.stdout and _ids(settings, folder) == {}


@pytest.mark.slow  # a live watcher
def test_the_watcher_keeps_the_images_of_a_folder_emptied_by_an_unmount(tmp_path, settings, model, photo_files):
    from searchengine.indexing.watch import Watcher
    from tests.indexing.test_watch import wait_until

    root, disk, away = tmp_path / "lib", tmp_path / "lib" / "disk", tmp_path / "away"
    disk.mkdir(parents=True), away.mkdir()
    for f in photo_files[:3]:
        shutil.copy(f, disk / f.name)
    library = Library.open(settings, create=True)
    watcher = Watcher(Indexer(model, library, settings), [disk], debounce_s=0.3, poll_interval_s=0.3)
    watcher.start()
    try:
        before = _ids(settings, disk.resolve())
        assert len(before) == 3
        for f in list(disk.iterdir()):
            f.rename(away / f.name)
        time.sleep(3)  # several debounce periods: the watcher has looked twice and decided
        assert watcher.pending() == 0 and _ids(settings, disk.resolve()) == before
        for f in list(away.iterdir()):
            f.rename(disk / f.name)
        shutil.copy(photo_files[4], disk / "new.jpg")
        wait_until(lambda: "new.jpg" in _ids(settings, disk.resolve()), "a new file indexed")
        assert {k: v for k, v in _ids(settings, disk.resolve()).items() if k != "new.jpg"} == before
    finally:
        watcher.stop()
        library.close()
