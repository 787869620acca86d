"""The watcher never forgets a change and never goes deaf: updates that fail (a full disk) are
retried until they commit, and a folder that is unmounted and mounted again, or removed and
made again, is watched again. Real mounts (tmpfs, bind): these tests need root, as CI has."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from searchengine.indexing.pipeline import Indexer
from searchengine.indexing.watch import Watcher
from searchengine.library import Library
from tests.helpers import fill_disk
from tests.indexing.test_watch import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs or a bind mount needs root")]


def small_jpeg(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8)).save(path, "JPEG")
    return path


def indexed_paths(library) -> set[str]:
    return {p for p, s in library.store.files_under("/").items() if s.status == "indexed"}


def on_disk(folder: Path) -> set[str]:
    return {str(p) for p in folder.rglob("*.jpg")}


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@contextmanager
def watching(settings, model, folder: Path) -> Iterator[tuple[Watcher, Library]]:
    """A started watcher on `folder` over a library in `settings`; stopped and closed after."""
    library = Library.open(settings, create=True)
    watcher = Watcher(Indexer(model, library, settings), [folder], debounce_s=0.3)
    watcher.start()
    try:
        yield watcher, library
    finally:
        watcher.stop()
        library.close()


@pytest.fixture
def tmpfs(tmp_path):
    where = tmp_path / "small-disk"
    where.mkdir()
    mount("-t", "tmpfs", "-o", "size=3m", "tmpfs", str(where))
    yield where
    umount(where)


def test_a_full_disk_delays_indexing_but_loses_nothing(settings, model, tmp_path, tmpfs):
    settings = settings.model_copy(update={"data_dir": tmpfs / "data", "backups": 0})
    folder = tmp_path / "photos"
    folder.mkdir()
    small_jpeg(folder / "first.jpg", 0)
    with watching(settings, model, folder) as (watcher, library):
        filler = tmpfs / "filler"
        fill_disk(filler)  # the data dir's disk, full to the last byte
        for i in range(12):
            small_jpeg(folder / f"new_{i:02d}.jpg", i + 1)
        wait_until(lambda: watcher.failure is not None, "an update failing on the full disk", timeout=30)
        assert watcher.health() is not None and "retrying" in watcher.health()
        assert watcher.pending() > 0  # kept, not forgotten
        filler.unlink()  # space again
        wait_until(lambda: indexed_paths(library) == on_disk(folder) and watcher.pending() == 0,
                   "every file indexed once the disk has room", timeout=60)
        assert watcher.health() is None


def test_files_a_failed_update_had_committed_leave_the_retry_list(settings, model, tmp_path):
    """/healthz stayed 503 for over 2 minutes after a full disk recovered and every file was
    indexed: the files the failed batch had committed stayed on the retry list for good."""
    folder = tmp_path / "photos"
    folder.mkdir()
    with watching(settings, model, folder) as (watcher, library):
        for i in range(3):
            small_jpeg(folder / f"p{i}.jpg", i)
        wait_until(lambda: len(indexed_paths(library)) == 3, "three files indexed")
        wait_until(lambda: watcher.pending() == 0, "the update that indexed them over")  # else it clears the list below
        # As after a batch that committed these, then failed on its next write.
        watcher._retry([str(folder / f"p{i}.jpg") for i in range(3)], OSError(28, "No space left on device"))
        assert "retrying" in (watcher.health() or "")
        with watcher._lock:  # due now rather than after the backoff
            for path in watcher._dirty:
                watcher._dirty[path] = 0.0
        wait_until(lambda: watcher.health() is None and watcher.pending() == 0,
                   "the failure cleared once the retried files are found indexed")
        assert not watcher._attempts and len(indexed_paths(library)) == 3


def test_a_folder_removed_and_made_again_is_watched_again(settings, model, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    small_jpeg(folder / "old.jpg", 0)
    with watching(settings, model, folder) as (watcher, library):
        shutil.rmtree(folder)
        time.sleep(0.5)
        folder.mkdir()
        small_jpeg(folder / "new.jpg", 1)
        wait_until(lambda: indexed_paths(library) == {str(folder / "new.jpg")},
                   "the new folder's file indexed and the old one's gone", timeout=30)
        small_jpeg(folder / "later.jpg", 2)  # and events are seen again, not just a rescan
        wait_until(lambda: str(folder / "later.jpg") in indexed_paths(library), "a later arrival indexed", timeout=30)


def test_a_folder_unmounted_and_mounted_again_is_watched_again(settings, model, tmp_path):
    source = tmp_path / "nas-share"
    source.mkdir()
    small_jpeg(source / "on-the-nas.jpg", 0)
    folder = tmp_path / "mnt" / "photos"
    folder.mkdir(parents=True)
    mount("--bind", str(source), str(folder))
    try:
        with watching(settings, model, folder) as (watcher, library):
            assert indexed_paths(library) == {str(folder / "on-the-nas.jpg")}
            before = library.store.files_under(str(folder))[str(folder / "on-the-nas.jpg")].image_id
            umount(folder)
            time.sleep(3)  # the watcher notices (it checks its folders every 2 s)
            # The empty mount point left behind is an absent folder, not an emptied one (its
            # images were all dropped, and came back with new ids and captions at the remount).
            assert indexed_paths(library) == {str(folder / "on-the-nas.jpg")}
            mount("--bind", str(source), str(folder))
            small_jpeg(folder / "arrived.jpg", 1)
            wait_until(lambda: indexed_paths(library) == on_disk(folder), "a file arriving after the remount indexed",
                       timeout=30)
            assert library.store.files_under(str(folder))[str(folder / "on-the-nas.jpg")].image_id == before
    finally:
        umount(folder)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_watcher_that_died_is_reported(settings, model, tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    try:
        with watching(settings, model, folder) as (watcher, library):
            assert watcher.health() is None
            monkeypatch.setattr(watcher._stop, "wait", lambda timeout=None: (_ for _ in ()).throw(SystemExit()))
            watcher._thread.join(timeout=10)
            assert "stopped" in (watcher.health() or "")
    finally:
        monkeypatch.undo()
