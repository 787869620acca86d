from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import update

from searchengine.errors import ModelMismatchError, SchemaError
from searchengine.media.keywords import parse_query
from searchengine.search import Filters
from searchengine.media.imageio import ImageMeta
from searchengine.store.schema import SCHEMA_VERSION, meta
from searchengine.store.records import ModelInfo
from searchengine.store.writes import Store
from searchengine.store.connection import sqlite_url
from searchengine.store.records import NewImage

INFO = ModelInfo("m", "abc", 2, 3, (5, 4))


@pytest.fixture
def store(store_url):
    """A store on SQLite, and on PostgreSQL: every test that takes it runs on both."""
    s = Store.open(store_url)
    s.bind_model(INFO)
    yield s
    s.close()


def _vec(seed):
    return np.random.default_rng(seed).standard_normal((2, 3)).astype(np.float32)


def test_wal_mode(tmp_path):
    s = Store.open(sqlite_url(tmp_path / "store.db"))
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    s.close()


def test_another_model_is_refused(store):
    store.bind_model(INFO)  # the same one is fine
    with pytest.raises(ModelMismatchError, match=r"'other' .* is another checkpoint\. Use the index's own \(--model m,"):
        store.bind_model(ModelInfo("other", "def", 2, 3, (5, 4)))


def test_changed_weights_at_the_same_path_are_named_as_such(store):
    """The same name with other weights is not "a different model, use --model <the same name>"."""
    store.bind_model(INFO)
    with pytest.raises(ModelMismatchError, match=r"the weights of model 'm' have changed since this index was built \(fingerprint abc then, xyz now\)") as e:
        store.bind_model(ModelInfo("m", "xyz", 2, 3, (5, 4)))
    assert "another architecture" not in str(e.value)
    with pytest.raises(ModelMismatchError, match=r"another architecture too: 4 vectors of 3 a image, ViT output 5x4 against the index's 2 vectors"):
        store.bind_model(ModelInfo("m", "xyz", 4, 3, (5, 4)))


def test_a_fingerprint_an_earlier_version_took_in_bf16_is_brought_up_to_date(store_url):
    """Indexes built in bf16 before the fingerprint was read from the files recorded the bf16
    rounding's: the same weights open them, and the record becomes the stored weights'."""
    store = Store.open(store_url)
    store.bind_model(ModelInfo("m", "bf16-taken", 2, 3, (5, 4), dtype="bfloat16"))
    with pytest.raises(ModelMismatchError):
        store.bind_model(ModelInfo("m", "stored", 2, 3, (5, 4)))
    store.bind_model(ModelInfo("m", "stored", 2, 3, (5, 4)), former={"bf16-taken", "fp16-taken"})
    assert store.model_info().fingerprint == "stored" and store.model_info().dtype == "bfloat16"
    store.bind_model(ModelInfo("m", "stored", 2, 3, (5, 4)))  # from now on without the former ones
    store.close()


def test_the_dtypes_and_devices_that_made_the_vectors_are_recorded(store_url):
    store = Store.open(store_url)
    store.bind_model(ModelInfo("m", "abc", 2, 3, (5, 4), dtype="float32", device="cpu"))
    assert store.made_by() == []  # no vectors yet
    for made_by in ("bfloat16 on cuda", "float32 on cpu", "bfloat16 on cuda"):
        store.record_made_by(made_by)
    assert store.made_by() == ["bfloat16 on cuda", "float32 on cpu"]
    store.close()


def test_an_index_from_before_made_by_was_kept_names_its_first_runs_dtype(store_url):
    store = Store.open(store_url)
    store.bind_model(ModelInfo("m", "abc", 2, 3, (5, 4), dtype="float32", device=""))
    store.write_batch(new_images=[NewImage("h1", ImageMeta(1, 1), _vec(1), None, b"", ("/a/1.jpg", 1, 1))])
    assert store.made_by() == ["float32"]
    store.record_made_by("bfloat16 on cpu")
    assert store.made_by() == ["float32", "bfloat16 on cpu"]
    store.close()


def test_newer_schema_is_refused(store_url):
    url = store_url
    s = Store.open(url)
    with s.engine.begin() as conn:
        conn.execute(update(meta).where(meta.c.key == "schema_version").values(value=str(SCHEMA_VERSION + 1)))
    s.close()
    with pytest.raises(SchemaError, match="upgrade"):
        Store.open(url)


def test_batch_links_and_orphans(store):
    ids, orphans = store.write_batch(
        new_images=[NewImage("h1", ImageMeta(10, 20), _vec(1), None, b"", ("/p/a.jpg", 1, 1))],
        links=[("/p/b.jpg", 1, 2, "h1")],
        failures=[("/p/bad.jpg", 0, 3, "empty", "file is empty")],
    )
    assert orphans == []
    (image_id,) = ids
    rec = store.images([image_id])[image_id]
    assert rec.paths == ["/p/a.jpg", "/p/b.jpg"] and (rec.width, rec.height) == (10, 20)
    got_ids, got_vecs = next(store.iter_vectors())
    assert got_ids.tolist() == [image_id]
    np.testing.assert_array_equal(got_vecs[0], _vec(1).astype(np.float16).astype(np.float32))  # stored as float16
    # a.jpg now holds new content: the old image is still shown by b.jpg, so it stays.
    ids2, orphans = store.write_batch(new_images=[NewImage("h2", ImageMeta(1, 1), _vec(2), None, b"", ("/p/a.jpg", 2, 5))])
    assert orphans == []
    # b.jpg goes: nothing shows h1 any more, so it is deleted with its vectors.
    assert store.remove_files(["/p/b.jpg"]) == [image_id]
    assert store.image_ids().tolist() == ids2
    assert store.image_id_for_hash("h1") is None
    stats = store.stats()
    assert (stats.images, stats.files, stats.failed) == (1, 1, 1)
    assert stats.failures_by_reason == {"empty": 1}
    assert stats.failures == [("/p/bad.jpg", "empty", "file is empty")]


def test_a_batch_is_a_few_statements_not_several_an_image(store):
    """The single writer keeps up with a GPU only if a batch costs a handful of statements:
    a batch of 300 new images and 300 re-pointed files runs no more statements than one of 3."""
    from sqlalchemy import event

    def statements(batch) -> tuple[int, list]:
        count = []
        listener = lambda *args: count.append(1)  # noqa: E731
        event.listen(store.engine, "before_cursor_execute", listener)
        try:
            ids, _ = store.write_batch(**batch)
        finally:
            event.remove(store.engine, "before_cursor_execute", listener)
        return len(count), ids

    def batch(n, tag):
        # Two paths an image: the image with its file, and a copy linked to it in the same batch.
        return {"new_images": [NewImage(f"{tag}{i}", ImageMeta(i + 1, 1), _vec(i), None, b"", (f"/s/{i}.jpg", 1, i))
                               for i in range(n)],
                "links": [(f"/s/{i}-copy.jpg", 1, i, f"{tag}{i}") for i in range(n)],
                "failures": [(f"/s/bad{i}.jpg", 0, 1, "empty", "e") for i in range(n)]}

    statements(batch(3, "a"))
    few, _ = statements(batch(3, "b"))  # the same paths, new content: the first 3 images go
    many, ids = statements(batch(300, "c"))  # 3 of them again, and 297 new ones
    assert many <= few + 2, (few, many)  # at most another chunk's lookup, never one an image
    # Each new image got its own id, in order, with its own vectors and paths.
    assert len(set(ids)) == 300 and ids == sorted(ids)
    records = store.images(ids)
    assert [records[i].width for i in ids] == list(range(1, 301))
    assert records[ids[7]].paths == ["/s/7.jpg", "/s/7-copy.jpg"]
    got = dict(zip(*(a.tolist() if k == 0 else list(a) for k, a in enumerate(next(store.iter_vectors(ids[:3]))))))
    np.testing.assert_array_equal(got[ids[2]], _vec(2).astype(np.float16).astype(np.float32))
    assert store.stats().images == 300  # the earlier batches' images lost every path: deleted


def test_a_path_twice_in_one_batch_ends_as_its_last_row(store):
    (kept,), _ = store.write_batch(new_images=[NewImage("k", ImageMeta(1, 1), _vec(1), None, b"", ("/t/keep.jpg", 1, 1))])
    ids, orphans = store.write_batch(
        new_images=[NewImage("n", ImageMeta(1, 1), _vec(2), None, b"", ("/t/x.jpg", 1, 2))],
        links=[("/t/x.jpg", 1, 3, "k")],  # later in the batch: x.jpg shows k's content after all
    )
    (new,) = ids
    assert orphans == [new]  # the new image was left with no file, so it is gone
    assert store.images([kept])[kept].paths == ["/t/keep.jpg", "/t/x.jpg"]
    assert store.image_id_for_hash("n") is None


def test_ids_are_never_reused(store):
    (a,), _ = store.write_batch(new_images=[NewImage("h1", ImageMeta(1, 1), _vec(1), None, b"", ("/x/1.jpg", 1, 1))])
    store.remove_files(["/x/1.jpg"])
    (b,), _ = store.write_batch(new_images=[NewImage("h2", ImageMeta(1, 1), _vec(2), None, b"", ("/x/2.jpg", 1, 1))])
    assert b > a


def test_files_under_is_a_prefix_not_a_pattern(store):
    store.write_batch(
        failures=[(p, 1, 1, "empty", "e") for p in ["/a/x_y/1.jpg", "/a/xzy/2.jpg", "/a/x_y2/3.jpg", "/a/x_y/sub/4.jpg"]]
    )
    assert sorted(store.files_under("/a/x_y")) == ["/a/x_y/1.jpg", "/a/x_y/sub/4.jpg"]
    assert sorted(store.files_under("/a/x_y/")) == ["/a/x_y/1.jpg", "/a/x_y/sub/4.jpg"]


# -- the full-text index ------------------------------------------------------------------


def _kw(store, text, limit=50):
    return [h.image_id for h in store.keyword_search(parse_query(text), limit)]


def test_full_text_rows_follow_every_write(store):
    store.add_root("/lib/Pictures")
    (a,), _ = store.write_batch(
        new_images=[NewImage("h1", ImageMeta(1, 1, caption="a dog running on the sand"), _vec(1), None, b"", ("/lib/Pictures/Holidays/IMG_0001.jpg", 1, 1))]
    )
    assert _kw(store, "dogs") == [a]  # caption, stemmed
    assert _kw(store, "holidays") == [a] and _kw(store, "pictures") == [a] and _kw(store, "0001") == [a]
    assert _kw(store, "lib") == [] and _kw(store, "jpg") == []  # above the root; the extension
    # A second path (a copy) adds its words; moving the first away drops its folder's words.
    store.write_batch(links=[("/lib/Pictures/Best of/copy.jpg", 1, 2, "h1")])
    assert _kw(store, "best") == [a]
    store.remove_files(["/lib/Pictures/Holidays/IMG_0001.jpg"])
    assert _kw(store, "holidays") == [] and _kw(store, "copy") == [a]
    # A new caption replaces the old words.
    store.set_captions([(a, "a cat asleep", "captioner-2", None)])
    assert _kw(store, "dog") == [] and _kw(store, "cat") == [a]
    assert store.image_detail(a).caption_model == "captioner-2"
    # A failed re-caption keeps the caption it had and records why.
    store.set_captions([(a, None, "captioner-3", "RuntimeError: boom")])
    d = store.image_detail(a)
    assert (d.caption, d.caption_model, d.caption_error) == ("a cat asleep", "captioner-2", "RuntimeError: boom")
    # The last path gone: the image and its row go.
    store.remove_files(["/lib/Pictures/Best of/copy.jpg"])
    assert _kw(store, "cat") == [] and _kw(store, "copy") == []
    with store.engine.connect() as conn:
        assert store.text.count(conn) == 0


def test_keyword_ranking_phrases_exclusions_and_filters(store):
    store.add_root("/p")
    rows = {
        "h1": ("red car on a street", "/p/cars/red_car.jpg"),
        "h2": ("a car parked near the red house", "/p/cars/parked.jpg"),
        "h3": ("a red flower", "/p/garden/flower.jpg"),
        "h4": ("a blue car", "/p/cars/blue.jpg"),
    }
    ids = {}
    for sha, (caption, path) in rows.items():
        (ids[sha],), _ = store.write_batch(new_images=[NewImage(sha, ImageMeta(1, 1, caption=caption), _vec(1), None, b"", (path, 1, 1))])
    hits = store.keyword_search(parse_query("red car"), 10)
    by_id = {h.image_id: h.coverage for h in hits}
    assert by_id == {ids["h1"]: 1.0, ids["h2"]: 1.0, ids["h3"]: 0.5, ids["h4"]: 0.5}
    assert {h.image_id for h in hits[:2]} == {ids["h1"], ids["h2"]}  # both words first
    assert _kw(store, '"red car"') == [ids["h1"]]  # the phrase, words adjacent
    assert set(_kw(store, "car -red")) == {ids["h4"]}
    assert set(_kw(store, 'car -"red house"')) == {ids["h1"], ids["h4"]}
    in_garden = store.keyword_search(parse_query("red"), 10, Filters(folder="/p/garden"))
    assert [h.image_id for h in in_garden] == [ids["h3"]]
    assert store.keyword_matches(parse_query("-flower -blue").excluded).tolist() == sorted([ids["h3"], ids["h4"]])


def test_a_version_1_store_is_upgraded_and_its_text_index_built(tmp_path):
    from sqlalchemy import text

    url = sqlite_url(tmp_path / "old.db")
    s = Store.open(url)
    s.bind_model(INFO)
    s.add_root("/p")
    s.write_batch(new_images=[NewImage("h1", ImageMeta(1, 1, caption="a sunny beach"), _vec(1), None, b"", ("/p/summer/a.jpg", 1, 1))])
    # Make it what version 1 wrote: no caption_error column, no full-text table.
    with s.engine.begin() as conn:
        conn.execute(text("DROP TABLE image_text"))
        conn.execute(text("ALTER TABLE images DROP COLUMN caption_error"))
        conn.execute(text("ALTER TABLE images DROP COLUMN lens"))
        conn.execute(update(meta).where(meta.c.key == "schema_version").values(value="1"))
    s.close()
    s = Store.open(url)
    try:
        with s.engine.connect() as conn:
            assert conn.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar() == str(SCHEMA_VERSION)
        assert len(_kw(s, "beach")) == 1 and len(_kw(s, "summer")) == 1
        assert s.image_detail(_kw(s, "beach")[0]).caption_error is None
    finally:
        s.close()


def test_paths_are_listed_oldest_first(store):
    (image_id,), _ = store.write_batch(new_images=[NewImage("h1", ImageMeta(10, 20), _vec(1), None, b"", ("/p/zebra.jpg", 1, 1))])
    store.write_batch(links=[("/p/aardvark.jpg", 1, 2, "h1")])  # a copy, added later, sorting first
    store.write_batch(links=[("/p/zebra.jpg", 1, 3, "h1")])  # touched again: updated in place
    assert store.images([image_id])[image_id].paths == ["/p/zebra.jpg", "/p/aardvark.jpg"]
    assert [f.path for f in store.image_detail(image_id).files] == ["/p/zebra.jpg", "/p/aardvark.jpg"]


def test_words_match_alike_on_every_backend(store):
    """What FTS5 (unicode61, diacritics off, porter) finds, PostgreSQL finds too: accents,
    other scripts, stemming, and short words that PostgreSQL would drop as stop words."""
    store.add_root("/lib")
    (a,), _ = store.write_batch(new_images=[NewImage("h1", ImageMeta(1, 1, caption="a dog on the sand at the Café"), _vec(1), None, b"", ("/lib/Zürich 東京/IMG_2.jpg", 1, 1))])
    (b,), _ = store.write_batch(new_images=[NewImage("h2", ImageMeta(1, 1, caption="cats sleeping"), _vec(2), None, b"", ("/lib/x/y.jpg", 1, 1))])
    for query, expected in (
        ("cafe", [a]), ("café", [a]), ("CAFE", [a]), ("zurich", [a]), ("zürich", [a]), ("東京", [a]),
        ("dogs", [a]), ("cat", [b]), ("sleep", [b]), ("on", [a]), ("the", [a]), ('"on the sand"', [a]),
        ('"the on"', []), ("dog -cafe", []), ("2", [a]),
    ):
        assert _kw(store, query) == expected, query


def test_writers_at_once_each_bump_the_revision(store_url):
    """Two writers side by side (two processes' stores: each its own connections): every
    committed batch adds one to the revision that readers poll, none is lost."""
    import threading

    stores = [Store.open(store_url) for _ in range(2)]
    stores[0].bind_model(INFO)
    before = stores[0].revision()
    errors = []

    def write(k: int) -> None:
        try:
            for i in range(15):
                stores[k].write_batch(failures=[(f"/w{k}/{i}.jpg", 1, 1, "empty", "e")])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert stores[1].revision() == before + 30
    assert len(stores[1].files_under("/w0")) == len(stores[1].files_under("/w1")) == 15
    for s in stores:
        s.close()


def test_content_another_writer_commits_first_is_linked_not_refused(store_url):
    """Two writers sharing one store, each with a copy of the same photo: the one whose
    transaction commits second links its file to the first one's image (its id: None),
    rather than failing on the unique content hash."""
    import threading

    from sqlalchemy import insert

    from searchengine.store.schema import images

    first, second = Store.open(store_url), Store.open(store_url)
    first.bind_model(INFO)
    result = {}
    try:
        with first.engine.begin() as conn:  # the first writer's transaction, still open
            conn.execute(insert(images).values(sha256="same", width=1, height=1, created_at=0.0))
            t = threading.Thread(target=lambda: result.update(
                out=second.write_batch(new_images=[NewImage("same", ImageMeta(1, 1), _vec(1), None, b"", ("/b/copy.jpg", 1, 1)),
                                                   NewImage("other", ImageMeta(2, 2), _vec(2), None, b"", ("/b/other.jpg", 1, 1))])))
            t.start()
            t.join(timeout=1.5)  # it waits on the first writer's row (PostgreSQL) or lock (SQLite)
            assert t.is_alive()
        t.join(timeout=60)
        new_ids, orphans = result["out"]
        assert new_ids[0] is None and isinstance(new_ids[1], int) and orphans == []
        same_id = first.image_id_for_hash("same")
        assert first.file_state("/b/copy.jpg").image_id == same_id
        assert first.file_state("/b/other.jpg").image_id == new_ids[1]
    finally:
        first.close(), second.close()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_store_file_deleted_or_replaced_under_an_open_store_is_never_used(tmp_path, how):
    """A running process went on reading and writing a store through its old, unlinked file
    (issue 27 B.5): its pooled connections, and new ones that made a fresh empty file in its
    place, or took the deleted file's inode number, so that a check by inode alone passed."""
    import os
    import shutil

    from searchengine.errors import StoreMissingError

    folder = tmp_path / "odd ?#% name"  # the path goes into an SQLite URI
    folder.mkdir()
    path = folder / "store.db"
    store = Store.open(sqlite_url(path))
    store.bind_model(ModelInfo(name="m", fingerprint="f" * 16, num_vectors=2, dim=4, vit_shape=(3, 8), dtype="float32"))
    store.engine.dispose()  # a new connection: through the URI
    assert store.model_info().name == "m"
    if how == "deleted":
        for f in folder.glob("store.db*"):
            f.unlink()
    else:
        shutil.copy(path, tmp_path / "copy.db")
        copy = os.stat(tmp_path / "copy.db").st_ino
        os.replace(tmp_path / "copy.db", path)
    for _ in range(2):  # a pooled connection, then (the pool let it go) a new one
        with pytest.raises(StoreMissingError, match=f"the store .*store.db {'was deleted' if how == 'deleted' else 'was replaced by another file'} while this process had it open"):
            store.model_info()
        store.engine.dispose()
    if how == "deleted":
        assert list(folder.iterdir()) == []  # no new, empty store made in its place
    else:
        assert os.stat(path).st_ino == copy  # left as the other process put it
    store.close()


def test_a_read_only_store_of_schema_3_shows_an_image_without_its_lens(tmp_path):
    """Schema 3 had no lens column and a read-only open does not upgrade it: an image's detail
    selected the column all the same, and /api/images/{id} was a 500 there."""
    from sqlalchemy import text

    url = sqlite_url(tmp_path / "old.db")
    s = Store.open(url)
    s.bind_model(INFO)
    (image_id,), _ = s.write_batch(new_images=[NewImage("h1", ImageMeta(3, 2, caption="a beach"), _vec(1), None, b"", ("/p/a.jpg", 1, 1))])
    with s.engine.begin() as conn:
        conn.execute(text("ALTER TABLE images DROP COLUMN lens"))
        conn.execute(update(meta).where(meta.c.key == "schema_version").values(value="3"))
    s.close()
    s = Store.open(url, read_only=True)
    try:
        d = s.image_detail(image_id)
        assert (d.width, d.height, d.caption, d.lens) == (3, 2, "a beach", None)
        assert [f.path for f in d.files] == ["/p/a.jpg"]
    finally:
        s.close()
