"""Which symlinks lead into the library: indexed, recorded, and served under one rule."""

from __future__ import annotations

import os
import shutil

from fastapi.testclient import TestClient

from searchengine.indexing.report import Report
from searchengine.indexing.pipeline import Indexer
from searchengine.app.api import create_app
from searchengine.library import Library
from searchengine.media.links import inside_library
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
        summary = Indexer(model, library, again, report=Report(skipped=lambda p, m: skipped.append((p, m)))).run([folder])
        assert summary.links_outside == 2 and summary.removed == 2
        assert library.store.files_under(str(folder)) == {}
        assert library.store.link_policy() == "folders"
    finally:
        library.close()
    assert {p for p, _ in skipped} == {str(folder / "link.jpg"), str(folder / "mine.jpg")}
    assert all("--links all" in m for _, m in skipped)


def _flip(link, target):
    """Point `link` at `target` in one step (a new link renamed over it), as an attacker would."""
    tmp = link.with_name(link.name + ".flip")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def test_a_link_flipped_after_the_check_serves_what_was_checked(settings, model, tmp_path, photo_files, monkeypatch):
    """`race.jpg` flipped from an indexed photo to ../secret/secret.txt between the check and
    the read: from outside, 229 of 3,000 responses carried the secret. The check is now of the
    open descriptor, so a flip after it changes nothing read; here the flip happens exactly
    there, every time (and in a real race of threads below)."""
    import threading

    from searchengine.library import Library as Lib

    folder, secret = tmp_path / "photos", tmp_path / "secret"
    folder.mkdir(), secret.mkdir()
    shutil.copy(photo_files[0], folder / "photo.jpg")
    (secret / "secret.txt").write_bytes(b"TOP SECRET " * 1000)
    (folder / "race.jpg").symlink_to("photo.jpg")
    ids = _index(settings, model, folder)
    photo = (folder / "photo.jpg").read_bytes()
    inside = Lib.inside

    def flip_after_the_check(self, path, real=None):
        ok = inside(self, path, real)
        if path.endswith("race.jpg"):
            _flip(folder / "race.jpg", "../secret/secret.txt")
        return ok

    monkeypatch.setattr(Lib, "inside", flip_after_the_check)
    with TestClient(create_app(settings, loader=lambda s: (model, Lib.open(s)))) as client:
        wait_healthy(client)
        r = client.get(f"/api/images/{ids['race.jpg']}/file")
        assert r.status_code == 200 and r.content == photo  # what was checked is what is sent
        assert b"SECRET" not in client.get(f"/api/images/{ids['race.jpg']}/file").content  # now flipped: refused
        monkeypatch.setattr(Lib, "inside", inside)
        _flip(folder / "race.jpg", "photo.jpg")
        stop = threading.Event()

        def flipper():
            while not stop.is_set():
                _flip(folder / "race.jpg", "../secret/secret.txt")
                _flip(folder / "race.jpg", "photo.jpg")

        t = threading.Thread(target=flipper, daemon=True)
        t.start()
        try:
            got = [client.get(f"/api/images/{ids['race.jpg']}/{what}") for _ in range(100) for what in ("file", "preview")]
        finally:
            stop.set()
            t.join()
    assert not any(b"SECRET" in r.content for r in got)
    assert all(r.status_code in (200, 404) for r in got) and any(r.status_code == 200 for r in got)
    assert all(r.content == photo for r in got if r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
               and r.url.path.endswith("/file"))


def test_a_bait_with_the_private_photos_size_and_mtime_does_not_serve_it(settings, model, tmp_path, photo_files):
    """An attacker's bait indexed under a folder link, with a private photo's size and mtime
    copied from a plain stat (truncate + touch -r), then the link re-pointed at the private
    folder: size and mtime match, the folder link is allowed anywhere (--links folders), and
    the private photo was served. Its content is not the indexed content: it is not."""
    folder, bait, private = tmp_path / "photos", tmp_path / "bait", tmp_path / "private"
    for d in (folder, bait, private):
        d.mkdir()
    jpegs = sorted((f for f in photo_files if f.suffix == ".jpg"), key=lambda f: f.stat().st_size)
    shutil.copy(jpegs[-1], private / "x.jpg")
    shutil.copy(jpegs[0], bait / "x.jpg")  # the smaller: made as large with zeros after its end
    st = os.stat(private / "x.jpg")
    os.truncate(bait / "x.jpg", st.st_size)
    os.utime(bait / "x.jpg", ns=(st.st_atime_ns, st.st_mtime_ns))
    (folder / "album").symlink_to(bait, target_is_directory=True)
    library = Library.open(settings, create=True)
    try:
        Indexer(model, library, settings).run([folder])
        image_id = library.store.files_under(str(folder))[str(folder / "album" / "x.jpg")].image_id
    finally:
        library.close()
    _flip(folder / "album", private)
    with TestClient(create_app(settings, loader=lambda s: (model, Library.open(s)))) as client:
        wait_healthy(client)
        for what in ("file", "preview"):
            r = client.get(f"/api/images/{image_id}/{what}")
            assert r.status_code == 404 and "no file left that is still the indexed content" in r.json()["error"], r.text
        _flip(folder / "album", bait)  # back: served again
        r = client.get(f"/api/images/{image_id}/file")
        assert r.status_code == 200 and r.content == (bait / "x.jpg").read_bytes()
