"""The store's schema migrations (Alembic, searchengine/migrations) on both backends: they make
exactly the schema the store's tables describe, and carry a version-1 store to the head."""

from __future__ import annotations

import numpy as np
from sqlalchemy import create_engine, insert, text

from searchengine.store import migrations
from searchengine.media.keywords import parse_query
from searchengine.media.imageio import ImageMeta
from searchengine.store.schema import SCHEMA_VERSION, meta, metadata, vectors
from searchengine.store.writes import Store
from searchengine.store.records import NewImage


def test_a_new_store_is_the_head_of_the_migrations_and_matches_the_tables(store_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    Store.open(store_url).close()
    engine = create_engine(store_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == str(SCHEMA_VERSION)
        assert conn.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar() == str(SCHEMA_VERSION)
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    # What the migrations made and what the code reads and writes are the same tables and
    # columns (the full-text index is the text backend's own, outside the table metadata).
    derived = ("image_text", "alembic_version")
    significant = [d for d in diff if not (d[0] == "remove_table" and d[1].name.startswith(derived))]
    structural = [d for d in significant if d[0] in ("add_table", "remove_table", "add_column", "remove_column")]
    assert structural == [], structural


def test_a_version_1_store_is_carried_to_the_head_on_each_backend(store_url):
    """Tables as version 1 made them (no caption_error or lens, no text index, float32
    vectors), no Alembic record: opening upgrades it, every step, in place."""
    engine = create_engine(store_url)
    with engine.begin() as conn:
        cfg = migrations.config(conn)
        from alembic import command

        command.upgrade(cfg, "1")
        conn.execute(text("DROP TABLE alembic_version"))  # stores from before Alembic have none
        conn.execute(insert(meta).values(key="schema_version", value="1"))
        vec = np.arange(6, dtype=np.float32).reshape(2, 3) / 10
        conn.execute(text("INSERT INTO images (sha256, width, height, caption, created_at) VALUES ('h', 4, 3, 'a sunny beach', 0)"))
        image_id = conn.execute(text("SELECT id FROM images WHERE sha256 = 'h'")).scalar()
        conn.execute(insert(vectors).values(image_id=image_id, data=vec.tobytes()))
        conn.execute(text("INSERT INTO files (path, image_id, size, mtime_ns, status, updated_at) "
                          "VALUES ('/p/summer/a.jpg', :i, 1, 1, 'indexed', 0)"), {"i": image_id})
    engine.dispose()
    store = Store.open(store_url)
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar() == str(SCHEMA_VERSION)
            blob = conn.execute(text("SELECT data FROM vectors WHERE image_id = :i"), {"i": image_id}).scalar()
            assert len(blob) == 6 * 2  # float16 now
            columns = set(conn.execute(text("SELECT * FROM images")).keys())
        assert {"caption_error", "lens"} <= columns
        np.testing.assert_array_equal(np.frombuffer(blob, np.float16), vec.ravel().astype(np.float16))
        assert [h.image_id for h in store.keyword_search(parse_query("summer"), 5)] == [image_id]
        assert store.image_detail(image_id).caption_error is None
        (new_id,), _ = store.write_batch(new_images=[NewImage("h2", ImageMeta(1, 1, lens="L"), vec, None, b"", ("/p/b.jpg", 1, 1))])
        assert new_id != image_id and store.image_detail(new_id).lens == "L"
    finally:
        store.close()
