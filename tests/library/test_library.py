"""The store is the truth; the FAISS file is derived and repaired on open."""

from __future__ import annotations

import numpy as np

from searchengine.library import Library
from searchengine.media.imageio import ImageMeta
from searchengine.store.records import ModelInfo
from searchengine.store.records import NewImage

INFO = ModelInfo("m", "fp", 2, 4, (3, 2))


def _add(library, sha, path, seed):
    vec = np.random.default_rng(seed).standard_normal((2, 4)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=-1, keepdims=True)
    ids, _ = library.store.write_batch(new_images=[NewImage(sha, ImageMeta(1, 1), vec, None, b"", (path, 1, 1))])
    return ids[0], vec


def test_index_missing_commits_are_added_and_deleted_ones_removed(settings):
    lib = Library.open(settings, create=True)
    lib.bind(INFO)
    a, _ = _add(lib, "a", "/p/a.jpg", 1)
    lib.add_vectors([a], np.stack([next(lib.store.iter_vectors([a]))[1][0]]))
    lib.save()
    # As if a run crashed after committing b but before saving the index, and after
    # deleting a from the store but before removing it from the index.
    b, vec_b = _add(lib, "b", "/p/b.jpg", 2)
    lib.store.remove_files(["/p/a.jpg"])
    lib.features.put(a, np.zeros((3, 2), np.float16))
    lib.thumbnails.put_bytes(a, b"jpeg")
    lib.previews.put_bytes(a, b"jpeg")
    lib.previews.put_bytes(b, b"jpeg")
    lib.close()

    lib = Library.open(settings)
    assert lib.index.ids().tolist() == [b]
    hit = lib.index.search(vec_b[0][None], 1)[0]
    assert hit.ids.tolist() == [b]
    assert lib.features.ids() == set()  # the cache entries of a deleted image are dropped
    assert lib.thumbnails.ids() == set()
    assert lib.previews.ids() == {b}  # a live image's preview stays
    lib.close()
    # The repair was saved: the file alone now holds exactly b.
    from searchengine.vectors.exact import VectorIndex

    assert VectorIndex.load(settings.vectors_path, 4, 2).ids().tolist() == [b]


def test_damaged_index_file_is_rebuilt_from_the_store(settings):
    lib = Library.open(settings, create=True)
    lib.bind(INFO)
    a, _ = _add(lib, "a", "/p/a.jpg", 1)
    lib.close()
    settings.vectors_path.write_bytes(b"not a faiss index")
    lib = Library.open(settings)
    assert lib.index.ids().tolist() == [a]
    lib.close()


def test_missing_index_is_a_clear_error(settings):
    import pytest

    from searchengine.errors import IndexNotFoundError

    with pytest.raises(IndexNotFoundError, match="searchengine index"):
        Library.open(settings)


def test_forgotten_images_lose_their_thumbnails_and_previews(settings):
    lib = Library.open(settings, create=True)
    lib.bind(INFO)
    a, _ = _add(lib, "a", "/p/a.jpg", 1)
    b, _ = _add(lib, "b", "/p/b.jpg", 2)
    for cache in (lib.thumbnails, lib.previews):
        cache.put_bytes(a, b"jpeg")
        cache.put_bytes(b, b"jpeg")
    lib.forget_images(lib.store.remove_files(["/p/a.jpg"]))
    assert lib.thumbnails.ids() == lib.previews.ids() == {b}
    assert settings.previews_dir in lib.previews.path(b).parents  # next to thumbnails/, in the data dir
    assert lib.sizes_on_disk()["previews"] == 4
    lib.close()


def test_folders_list_subfolders_with_image_counts(settings):
    lib = Library.open(settings, create=True)
    lib.bind(INFO)
    lib.store.add_root("/lib")
    _add(lib, "a", "/lib/Trips/Winter 2022/a.jpg", 1)
    _add(lib, "b", "/lib/Trips/Winter 2022/day 2/b.jpg", 2)
    _add(lib, "c", "/lib/c.jpg", 3)
    # The same content under two paths of one folder counts once.
    lib.store.write_batch(links=[("/lib/Trips/Winter 2022/copy of a.jpg", 1, 1, "a")])
    got = {f.path: f.images for f in lib.catalog.folders()}
    assert got == {"/lib": 3, "/lib/Trips": 2, "/lib/Trips/Winter 2022": 2, "/lib/Trips/Winter 2022/day 2": 1}
    assert [f.path for f in lib.catalog.folders()] == sorted(got)  # above the root: nothing
    lib.close()


def test_a_writer_bringing_the_fingerprint_up_to_date_is_no_model_change_for_a_reader(settings):
    """A server bound to an index with a bf16-taken fingerprint (an earlier version's) goes on
    when an `index` run rewrites it as the stored weights'; a re-index to other weights is
    still a change, also after the reader has bound several models."""
    old = ModelInfo("m", "bf16-taken", 2, 4, (3, 2), dtype="bfloat16")
    new = ModelInfo("m", "stored", 2, 4, (3, 2))
    lib = Library.open(settings, create=True)
    lib.bind(old)
    lib.close()
    reader = Library.open(settings)
    reader.bind(new, former={"bf16-taken"})
    writer = Library.open(settings, writable=True, vectors=False)
    writer.bind(new, former={"bf16-taken"})
    assert writer.store.model_info().fingerprint == "stored"
    assert not reader.model_changed()
    with writer.store.engine.begin() as conn:  # as a re-index's swap records another model
        writer.store._set_meta(conn, "model", '{"name": "other", "fingerprint": "x", "num_vectors": 2, "dim": 4, "vit_shape": [3, 2]}')
    assert reader.model_changed()
    writer.close()
    reader.close()


def test_a_vector_index_from_another_library_is_found_out_and_rebuilt(settings, tmp_path):
    """Same ids, other vectors: reconciling ids kept the wrong vectors and `check` said ok.
    Now `check` compares every image's vectors with the store's, and opening compares a
    sample and rebuilds the file from the store."""
    other_settings = settings.model_copy(update={"data_dir": tmp_path / "other"})
    mine, theirs = Library.open(settings, create=True), Library.open(other_settings, create=True)
    vecs = {}
    for lib, seeds in ((mine, (1, 2)), (theirs, (3, 4))):
        lib.bind(INFO)
        for name, seed in zip("ab", seeds):
            image_id, vec = _add(lib, name + str(seed), f"/p/{name}.jpg", seed)
            vecs[lib is mine, image_id] = vec
        lib.reconcile()
        lib.save()
    assert set(mine.index.ids().tolist()) == set(theirs.index.ids().tolist())  # the same ids
    mine.close(), theirs.close()
    settings.vectors_path.write_bytes(other_settings.vectors_path.read_bytes())

    checker = Library.open(settings, writable=False, vectors=False)  # as `searchengine check` reads it
    report = dict((what.split(":")[0], (sound, what)) for sound, what in checker.check())
    checker.close()
    sound, what = report["vector index against the store"]
    assert not sound and "2 images' vectors compared, 2 differ" in what, what

    lib = Library.open(settings)
    try:
        for (is_mine, image_id), vec in vecs.items():
            if is_mine:
                hit = lib.index.search(vec[:1], 1)[0]
                assert hit.ids.tolist() == [image_id] and hit.scores[0] > 0.99  # the store's vectors, not theirs
        report = dict((what.split(":")[0], (sound, what)) for sound, what in lib.check())
        assert report["vector index against the store"] == (True, "vector index against the store: 2 images' vectors compared, all the same")
    finally:
        lib.close()
