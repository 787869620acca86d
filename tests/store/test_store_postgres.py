"""What only PostgreSQL needs: folder filters on a database whose collation is not byte order."""

from __future__ import annotations

from sqlalchemy import create_engine, select, text

from searchengine.search import Filters
from searchengine.store.writes import Store
from searchengine.store.schema import files, folder_condition
from tests.store.test_store import INFO


def test_folder_filters_hold_under_a_linguistic_collation(postgres):
    """An ICU en-US database (PostgreSQL's usual default outside the C locale) orders '_',
    '/' and digits other than by bytes; the paths keep byte order (COLLATE "C"), so a folder's
    range scan takes its files and no other."""
    engine = create_engine(postgres.url(), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("CREATE DATABASE icu_db LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8' TEMPLATE template0"))
    engine.dispose()
    store = Store.open(postgres.url("icu_db"))
    try:
        with store.engine.connect() as conn:
            # The database's own order would put this file inside the folder's range.
            inside = "SELECT '/a/X_Y/6.jpg' >= '/a/x_y/' AND '/a/X_Y/6.jpg' < '/a/x_y0'"
            assert conn.execute(text(inside)).scalar() is True
        store.bind_model(INFO)
        paths = ["/a/x_y/1.jpg", "/a/xzy/2.jpg", "/a/x_y2/3.jpg", "/a/x_y/sub/4.jpg", "/a/x_y-z/5.jpg", "/a/X_Y/6.jpg"]
        store.write_batch(failures=[(p, 1, 1, "empty", "e") for p in paths])
        assert sorted(store.files_under("/a/x_y")) == ["/a/x_y/1.jpg", "/a/x_y/sub/4.jpg"]
        with store.engine.connect() as conn:
            got = sorted(conn.execute(select(files.c.path).where(folder_condition("/a/x_y"))).scalars())
        assert got == ["/a/x_y/1.jpg", "/a/x_y/sub/4.jpg"]
        assert store.filter_ids(Filters(folder="/a/x_y")).size == 0  # failures only: no image ids
    finally:
        store.close()
