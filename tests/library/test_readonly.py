"""A data directory that cannot be written (a read-only mount, a backup) opens for reading:
searches work, nothing on disk changes, and writers are refused with the path named."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import update

from searchengine.errors import ReadOnlyIndexError
from searchengine.library import Library
from searchengine.media.imageio import ImageMeta
from searchengine.store.records import ModelInfo
from searchengine.store.schema import meta
from tests.readonly import read_only_view
from searchengine.store.records import NewImage

INFO = ModelInfo("m", "fp", 2, 4, (3, 2))


def _add(library, sha, path, seed):
    vec = np.random.default_rng(seed).standard_normal((2, 4)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=-1, keepdims=True)
    ids, _ = library.store.write_batch(new_images=[NewImage(sha, ImageMeta(1, 1), vec, None, b"", (path, 1, 1))])
    return ids[0]


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_read_only_index_is_searched_as_it_is_and_left_unchanged(settings, tmp_path):
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (40, 30), "red").save(photo)
    lib = Library.open(settings, create=True)
    lib.bind(INFO)
    a = _add(lib, "a", "/p/a.jpg", 1)
    lib.save()
    # As a crash would leave it: b committed but not in the FAISS file; c deleted from the
    # store with its cache files still there.
    b = _add(lib, "b", str(photo), 2)
    c = _add(lib, "c", "/p/c.jpg", 3)
    lib.store.remove_files(["/p/c.jpg"])
    lib.features.put(c, np.zeros((3, 2), np.float16))
    lib.thumbnails.put_bytes(c, b"jpeg")
    lib.close()
    before = _snapshot(settings.data_dir)
    faiss_bytes = settings.vectors_path.read_bytes()

    with read_only_view(settings.data_dir, tmp_path / "ro") as view:
        ro = Library.open(settings.model_copy(update={"data_dir": view}))
        try:
            assert not ro.writable
            assert sorted(ro.index.ids().tolist()) == [a, b]  # reconciled in memory
            assert ro.describe()["images"] == 2
            ro.save()  # a no-op, not an error
            # A thumbnail it lacks is made outside the read-only folder.
            jpeg = ro.thumbnails.get(b, photo.read_bytes)
            thumb = ro.thumbnails._writer().path(b)
            assert jpeg.startswith(b"\xff\xd8") and thumb.is_file() and not thumb.is_relative_to(view)
            assert ro.thumbnails.cached(b) == jpeg  # kept in the spill folder, served from there
            with pytest.raises(ReadOnlyIndexError):
                ro.forget_images([a])
        finally:
            ro.close()
        assert not thumb.exists()  # the spill folder goes with the library
    assert _snapshot(settings.data_dir) == before
    assert settings.vectors_path.read_bytes() == faiss_bytes
    writer = Library.open(settings)
    assert writer.thumbnails.ids() == set()  # the writer drops c's stale entry
    writer.close()


def test_writers_are_refused_at_once_with_the_path(settings, tmp_path, model):
    from searchengine.indexing.pipeline import Indexer

    Library.open(settings, create=True).close()
    with read_only_view(settings.data_dir, tmp_path / "ro") as view:
        ro_settings = settings.model_copy(update={"data_dir": view})
        with pytest.raises(ReadOnlyIndexError, match=f"{re.escape(str(view))} is not writable"):
            Library.check_writable(ro_settings)
        with pytest.raises(ReadOnlyIndexError, match=f"{re.escape(str(view))} is not writable.*--data-dir"):
            Library.open(ro_settings, create=True, writable=True)
        ro = Library.open(ro_settings, create=True)  # a reader's open
        try:
            with pytest.raises(ReadOnlyIndexError, match=f"{re.escape(str(view))} is not writable"):
                Indexer(model, ro, ro_settings)
        finally:
            ro.close()
        new_settings = settings.model_copy(update={"data_dir": view / "new"})
        with pytest.raises(ReadOnlyIndexError, match="none can be made there"):
            Library.open(new_settings, create=True)


def test_an_older_schema_is_not_upgraded_read_only(settings, tmp_path):
    lib = Library.open(settings, create=True)
    with lib.store.engine.begin() as conn:
        conn.execute(update(meta).where(meta.c.key == "schema_version").values(value="1"))
    lib.close()
    with read_only_view(settings.data_dir, tmp_path / "ro") as view:
        with pytest.raises(ReadOnlyIndexError, match="schema version 1.*run a write command"):
            Library.open(settings.model_copy(update={"data_dir": view}))
