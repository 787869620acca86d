"""Which symlinks lead into the library: indexed, recorded, and served under one rule."""

from __future__ import annotations

import os
import shutil

from fastapi.testclient import TestClient

from indexer.pipeline import Indexer
from searchengine.api import create_app
from searchengine.library import Library
from searchengine.links import inside_library
from tests.helpers import wait_healthy


def test_inside_the_library_is_the_roots_and_the_folder_links_on_the_way(tmp_path):
    lib, ext, other = tmp_path / "lib", tmp_path / "ext", tmp_path / "other"
    for d in (lib / "sub", ext, other):
        d.mkdir(parents=True)
    for f in (lib / "sub" / "a.jpg", ext / "b.jpg", other / "c.jpg"):
        f.write_bytes(b"x")
    (lib / "ext").symlink_to(ext, target_is_directory=True)
    (lib / "to-a.jpg").symlink_to(lib / "sub" / "a.jpg")
    (lib / "to-c.jpg").symlink_to(other / "c.jpg")
    (ext / "to-c.jpg").symlink_to(other / "c.jpg")
    roots = [str(lib)]

    def inside(rel: str, policy: str) -> bool:
        return inside_library(str(lib / rel), roots, policy)

    assert inside("sub/a.jpg", "none") and inside("to-a.jpg", "none")
    assert inside("ext/b.jpg", "folders") and not inside("ext/b.jpg", "none")
    assert not inside("to-c.jpg", "folders") and not inside("ext/to-c.jpg", "folders")
    assert all(inside(p, "all") for p in ("to-c.jpg", "ext/to-c.jpg", "ext/b.jpg"))
    assert inside_library(str(lib / "to-c.jpg"), [*roots, str(other)], "folders")  # another root
    assert not inside_library(str(other / "c.jpg"), roots, "folders")  # below no root at all


def _index(settings, model, folder) -> dict[str, int]:
    library = Library.open(settings, create=True)
    try:
        Indexer(model, library, settings).run([folder])
        return {os.path.basename(p): s.image_id for p, s in library.store.files_under(str(folder)).items()}
    finally:
        library.close()


def test_a_path_that_resolves_outside_the_library_is_not_served_unless_allowed(settings, model, tmp_path, photo_files):
    folder, outside = tmp_path / "photos", tmp_path / "outside"
    folder.mkdir(), outside.mkdir()
    shutil.copy(photo_files[0], folder / "mine.jpg")
    shutil.copy(photo_files[1], outside / "theirs.jpg")
    (folder / "link.jpg").symlink_to(outside / "theirs.jpg")

    # Indexed with --links all: recorded, so a later serve with no setting serves the link.
    allowed = settings.model_copy(update={"links": "all"})
    ids = _index(allowed, model, folder)
    assert set(ids) == {"mine.jpg", "link.jpg"}
    with TestClient(create_app(settings, loader=lambda s: (model, Library.open(s)))) as client:
        wait_healthy(client)
        assert client.get(f"/api/images/{ids['link.jpg']}/file").content == (outside / "theirs.jpg").read_bytes()

    # The same index served with --links folders: the link's content is not served.
    strict = settings.model_copy(update={"links": "folders"})
    # A plain file swapped for a link to an identical copy outside (same size and mtime, so the
    # content check alone would pass it).
    copy = outside / "mine-copy.jpg"
    shutil.copy2(folder / "mine.jpg", copy)
    st = os.stat(folder / "mine.jpg")
    (folder / "mine.jpg").unlink()
    (folder / "mine.jpg").symlink_to(copy)
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    with TestClient(create_app(strict, loader=lambda s: (model, Library.open(s)))) as client:
        wait_healthy(client)
        for name in ("link.jpg", "mine.jpg"):
            for what in ("file", "preview", "thumbnail"):
                r = client.get(f"/api/images/{ids[name]}/{what}")
                assert r.status_code == 404 and "outside the library" in r.json()["error"], (name, what, r.text)

    # Re-indexed with the default policy, the link that leads outside is dropped and reported.
    again = settings.model_copy(update={"links": "folders"})
    library = Library.open(again)
    skipped: list[tuple[str, str]] = []
    try:
        summary = Indexer(model, library, again, on_skip=lambda p, m: skipped.append((p, m))).run([folder])
        assert summary.links_outside == 2 and summary.removed == 2
        assert library.store.files_under(str(folder)) == {}
        assert library.store.link_policy() == "folders"
    finally:
        library.close()
    assert {p for p, _ in skipped} == {str(folder / "link.jpg"), str(folder / "mine.jpg")}
    assert all("--links all" in m for _, m in skipped)
