from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import update

from searchengine.errors import ModelMismatchError, SchemaError
from searchengine.store import SCHEMA_VERSION, ImageMeta, ModelInfo, Store, meta, sqlite_url

INFO = ModelInfo("m", "abc", 2, 3, (5, 4))


@pytest.fixture
def store(tmp_path):
    s = Store.open(sqlite_url(tmp_path / "store.db"))
    s.bind_model(INFO)
    yield s
    s.close()


def _vec(seed):
    return np.random.default_rng(seed).standard_normal((2, 3)).astype(np.float32)


def test_wal_mode(store):
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_another_model_is_refused(store):
    store.bind_model(INFO)  # the same one is fine
    with pytest.raises(ModelMismatchError, match="--model m"):
        store.bind_model(ModelInfo("other", "def", 2, 3, (5, 4)))


def test_newer_schema_is_refused(tmp_path):
    url = sqlite_url(tmp_path / "s.db")
    s = Store.open(url)
    with s.engine.begin() as conn:
        conn.execute(update(meta).where(meta.c.key == "schema_version").values(value=str(SCHEMA_VERSION + 1)))
    s.close()
    with pytest.raises(SchemaError, match="upgrade"):
        Store.open(url)


def test_batch_links_and_orphans(store):
    ids, orphans = store.write_batch(
        new_images=[("h1", ImageMeta(10, 20), _vec(1), [("/p/a.jpg", 1, 1)])],
        links=[("/p/b.jpg", 1, 2, "h1")],
        failures=[("/p/bad.jpg", 0, 3, "empty", "file is empty")],
    )
    assert orphans == []
    (image_id,) = ids
    rec = store.images([image_id])[image_id]
    assert rec.paths == ["/p/a.jpg", "/p/b.jpg"] and (rec.width, rec.height) == (10, 20)
    got_ids, got_vecs = next(store.iter_vectors())
    assert got_ids.tolist() == [image_id]
    np.testing.assert_array_equal(got_vecs[0], _vec(1))
    # a.jpg now holds new content: the old image is still shown by b.jpg, so it stays.
    ids2, orphans = store.write_batch(new_images=[("h2", ImageMeta(1, 1), _vec(2), [("/p/a.jpg", 2, 5)])])
    assert orphans == []
    # b.jpg goes: nothing shows h1 any more, so it is deleted with its vectors.
    assert store.remove_files(["/p/b.jpg"]) == [image_id]
    assert store.image_ids().tolist() == ids2
    assert store.image_id_for_hash("h1") is None
    stats = store.stats()
    assert (stats.images, stats.files, stats.failed) == (1, 1, 1)
    assert stats.failures_by_reason == {"empty": 1}
    assert stats.failures == [("/p/bad.jpg", "empty", "file is empty")]


def test_ids_are_never_reused(store):
    (a,), _ = store.write_batch(new_images=[("h1", ImageMeta(1, 1), _vec(1), [("/x/1.jpg", 1, 1)])])
    store.remove_files(["/x/1.jpg"])
    (b,), _ = store.write_batch(new_images=[("h2", ImageMeta(1, 1), _vec(2), [("/x/2.jpg", 1, 1)])])
    assert b > a


def test_files_under_is_a_prefix_not_a_pattern(store):
    store.write_batch(
        failures=[(p, 1, 1, "empty", "e") for p in ["/a/x_y/1.jpg", "/a/xzy/2.jpg", "/a/x_y2/3.jpg", "/a/x_y/sub/4.jpg"]]
    )
    assert sorted(store.files_under("/a/x_y")) == ["/a/x_y/1.jpg", "/a/x_y/sub/4.jpg"]
    assert sorted(store.files_under("/a/x_y/")) == ["/a/x_y/1.jpg", "/a/x_y/sub/4.jpg"]
