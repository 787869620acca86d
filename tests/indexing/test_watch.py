"""The watcher with real filesystem events (inotify, and polling), a tiny model, real photos."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import pytest

from searchengine.indexing.pipeline import Indexer
from searchengine.indexing.watch import Watcher, filesystem_type
from searchengine.library import Library
from tests.indexing.test_pipeline import consistent

# Every change is reflected within this many seconds (debounce 0.3 s, looked at twice, plus
# one poll interval and the embedding of a few images by the tiny model on 2 cores).
BOUND_S = 15.0


def wait_until(condition, what: str, timeout: float = BOUND_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


@pytest.fixture(params=["native", "polling"])
def watched(request, settings, model, tmp_path, photo_files):
    folder = tmp_path / "lib"
    (folder / "trip").mkdir(parents=True)
    for f in photo_files[:2]:
        shutil.copy(f, folder / f.name)
    for f in photo_files[2:4]:
        shutil.copy(f, folder / "trip" / f.name)
    library = Library.open(settings, create=True)
    watcher = Watcher(Indexer(model, library, settings), [folder], poll=request.param == "polling",
                      debounce_s=0.3, poll_interval_s=0.3)
    summary = watcher.start()
    assert summary.indexed == 4 and watcher.modes == {str(folder.resolve()): request.param}
    yield watcher, folder.resolve(), library
    watcher.stop()
    library.close()


def ids_by_path(library) -> dict[str, int]:
    return {p: s.image_id for p, s in library.store.files_under("/").items() if s.status == "indexed"}


@pytest.mark.slow  # a live watcher: real file-system events, debounce and polling waits
def test_the_index_follows_the_folder(watched, photo_files, settings):
    watcher, folder, library = watched
    before = ids_by_path(library)
    # New files.
    for f in photo_files[4:6]:
        shutil.copy(f, folder / f.name)
    wait_until(lambda: len(ids_by_path(library)) == 6, "two new files indexed")
    # A rename keeps the image's id.
    old = folder / photo_files[0].name
    old_id = before[str(old)]
    old.rename(folder / "renamed.jpg")
    wait_until(lambda: str(old) not in ids_by_path(library), "the old name gone")
    assert ids_by_path(library)[str(folder / "renamed.jpg")] == old_id
    # A whole folder moved keeps its images' ids.
    trip_ids = {Path(p).name: i for p, i in before.items() if "/trip/" in p}
    (folder / "trip").rename(folder / "holidays")
    wait_until(lambda: all(str(folder / "holidays" / n) in ids_by_path(library) for n in trip_ids), "the moved folder")
    wait_until(lambda: not any("/trip/" in p for p in ids_by_path(library)), "the old folder gone")
    assert {Path(p).name: i for p, i in ids_by_path(library).items() if "/holidays/" in p} == trip_ids
    # A modified file is embedded again (new content), and its old image goes.
    target = folder / photo_files[1].name
    old_id = ids_by_path(library)[str(target)]
    target.write_bytes(photo_files[7].read_bytes())
    wait_until(lambda: ids_by_path(library).get(str(target), old_id) != old_id, "the modified file re-embedded")
    assert old_id not in set(library.store.image_ids().tolist())
    # A deleted file leaves store and index.
    gone = folder / photo_files[4].name
    gone_id = ids_by_path(library)[str(gone)]
    gone.unlink()
    wait_until(lambda: str(gone) not in ids_by_path(library), "the deleted file gone")
    assert gone_id not in set(library.index.ids().tolist())
    wait_until(lambda: watcher.pending() == 0, "nothing pending")
    assert len(consistent(settings)) == 5  # 4 + 2 new - 1 deleted (moves and edits keep the count)


@pytest.mark.slow  # a live watcher: real file-system events, debounce and polling waits
def test_a_file_copied_slowly_is_indexed_once_whole(watched, photo_files):
    watcher, folder, library = watched
    data = max((f.read_bytes() for f in photo_files[:10]), key=len)
    target = folder / "slow.jpg"
    seen_states = set()
    with open(target, "wb") as f:
        for i in range(8):
            f.write(data[i * len(data) // 8 : (i + 1) * len(data) // 8])
            f.flush()
            time.sleep(0.25)  # slower than the debounce: a half-written file must still wait
            seen_states.add(library.store.file_state(str(target)))
    assert seen_states == {None}  # never read (let alone recorded as truncated) while copying
    wait_until(lambda: str(target) in ids_by_path(library), "the copied file indexed")
    state = library.store.file_state(str(target))
    assert state.status == "indexed"
    image_id = ids_by_path(library)[str(target)]
    sha = hashlib.sha256(data).hexdigest()
    assert library.store.image_id_for_hash(sha) == image_id  # the whole file's content


@pytest.mark.slow  # a live watcher: real file-system events, debounce and polling waits
def test_a_folder_moved_in_from_outside_is_indexed(watched, photo_files, tmp_path):
    watcher, folder, library = watched
    outside = tmp_path / "outside"
    outside.mkdir()
    for f in photo_files[8:10]:
        shutil.copy(f, outside / f.name)
    outside.rename(folder / "arrived")
    wait_until(lambda: sum("/arrived/" in p for p in ids_by_path(library)) == 2, "the arrived folder")


def test_filesystem_type_is_read_from_the_mounts(tmp_path):
    assert filesystem_type(Path("/")) != ""
    assert filesystem_type(tmp_path) != ""


@pytest.mark.slow  # a live watcher: real file-system events, debounce and polling waits
def test_a_library_inside_a_hidden_folder_is_watched_but_hidden_subfolders_are_not(settings, model, tmp_path, photo_files):
    folder = tmp_path / ".hidden-home" / "photos"
    folder.mkdir(parents=True)
    library = Library.open(settings, create=True)
    watcher = Watcher(Indexer(model, library, settings), [folder], debounce_s=0.3)
    watcher.start()
    try:
        shutil.copy(photo_files[0], folder / "seen.jpg")
        (folder / ".thumbs").mkdir()
        shutil.copy(photo_files[1], folder / ".thumbs" / "unseen.jpg")
        wait_until(lambda: str(folder.resolve() / "seen.jpg") in ids_by_path(library), "the photo in a hidden home")
        wait_until(lambda: watcher.pending() == 0, "nothing pending")
        assert list(ids_by_path(library)) == [str(folder.resolve() / "seen.jpg")]
    finally:
        watcher.stop()
        library.close()


@pytest.mark.slow  # a live watcher: real file-system events, debounce and polling waits
@pytest.mark.parametrize("mode", ["native", "polling"])
def test_symlinked_folders_are_indexed_at_start_and_when_linked(mode, settings, model, tmp_path, photo_files):
    import os

    folder, outside, later = tmp_path / "lib", tmp_path / "outside", tmp_path / "later"
    for d, f in ((folder, photo_files[0]), (outside, photo_files[1]), (later, photo_files[2])):
        d.mkdir()
        shutil.copy(f, d / f.name)
    os.symlink(outside, folder / "ext")
    os.symlink("..", folder / "loop")
    library = Library.open(settings, create=True)
    watcher = Watcher(Indexer(model, library, settings), [folder], poll=mode == "polling", debounce_s=0.3, poll_interval_s=0.3)
    try:
        summary = watcher.start()
        assert (summary.indexed, summary.links_skipped) == (2, 1)
        assert str(folder / "ext" / photo_files[1].name) in ids_by_path(library)
        # A folder link made while watching: inotify reports it as a file; its files are marked.
        os.symlink(later, folder / "later")
        new_path = str(folder / "later" / photo_files[2].name)
        wait_until(lambda: new_path in ids_by_path(library), "the files of a new folder link indexed")
        (folder / "later").unlink()
        wait_until(lambda: new_path not in ids_by_path(library), "the files of a removed folder link dropped")
        # File links made while watching: one into the library is indexed, one out of it never.
        private = tmp_path / "private"
        private.mkdir()
        shutil.copy(photo_files[4], private / "p.jpg")
        os.symlink(private / "p.jpg", folder / "secret.jpg")
        os.symlink(folder / photo_files[0].name, folder / "again.jpg")
        wait_until(lambda: str(folder / "again.jpg") in ids_by_path(library), "a file link into the library indexed")
        time.sleep(1.0)  # the two links settle together; give the outside one its chance too
        assert str(folder / "secret.jpg") not in ids_by_path(library)
        if mode == "polling":  # polling also sees inside a linked folder (inotify does not)
            shutil.copy(photo_files[3], outside / photo_files[3].name)
            inside = str(folder / "ext" / photo_files[3].name)
            wait_until(lambda: inside in ids_by_path(library), "a file added inside a linked folder indexed")
    finally:
        watcher.stop()
        library.close()


@pytest.mark.slow  # a live watcher
@pytest.mark.parametrize("mode", ["native", "polling"])
def test_files_that_arrive_during_the_start_up_scan_are_indexed(mode, settings, model, tmp_path, photo_files):
    """Watching began after the catch-up scan: files that came in between were never indexed
    (100 of 300, from outside, with /healthz ok). Here they arrive as the scan finishes."""
    folder = tmp_path / "lib"
    folder.mkdir()
    for f in photo_files[:2]:
        shutil.copy(f, folder / f.name)
    library = Library.open(settings, create=True)
    indexer = Indexer(model, library, settings)
    scan = indexer.run

    def scan_then_arrivals(roots):
        summary = scan(roots)  # listed, embedded and written: these came too late for it
        for f in photo_files[2:5]:
            shutil.copy(f, folder / f.name)
        return summary

    indexer.run = scan_then_arrivals
    watcher = Watcher(indexer, [folder], poll=mode == "polling", debounce_s=0.3, poll_interval_s=0.3)
    try:
        assert watcher.start().indexed == 2
        want = {str(folder.resolve() / f.name) for f in photo_files[:5]}
        wait_until(lambda: want <= set(ids_by_path(library)), "the files that arrived during the scan indexed")
        assert watcher.health() is None
    finally:
        watcher.stop()
        library.close()
