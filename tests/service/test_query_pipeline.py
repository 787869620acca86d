"""The one query pipeline (the CLI's and the service's): a fresh text query costs at most two
statements in the store in every mode, with the ViT feature cache and without it; many
queries at once share the model."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from sqlalchemy import event

from searchengine.indexing.pipeline import Indexer
from searchengine.library import Library
from searchengine.search import Searcher, SearchRequest
from searchengine.service import QueryService
from tests.helpers import photos_in, settings_for


@pytest.fixture(scope="module")
def counted(tmp_path_factory, tiny_model_dir, model, photos_dir):
    """One indexed library for the module: the tests only search it (each with its own
    searcher or service, so no ranking is kept from one test to the next)."""
    tmp_path = tmp_path_factory.mktemp("query-pipeline")
    folder = tmp_path / "beach photos"
    folder.mkdir()
    # Photos of 1-2 MP: the statements are counted, and the ITM "recompute" mode decodes each
    # candidate's file again on every query (the 8 and 16 MB wallpapers took 5 s a test).
    for f in [f for f in photos_in(photos_dir) if f.stat().st_size < 4_000_000][:8]:
        shutil.copy(f, folder / f.name)
    settings = settings_for(tmp_path / "data", tiny_model_dir, refresh_interval_s=3600)
    library = Library.open(settings, create=True)
    Indexer(model, library, settings).run([folder])
    statements: list[str] = []
    event.listen(library.store.engine, "before_cursor_execute", lambda conn, cur, sql, *rest: statements.append(sql))
    yield settings, library, statements
    library.close()


@pytest.mark.parametrize("mode", ["semantic", "hybrid", "keyword"])
@pytest.mark.parametrize("features", ["cache", "recompute"])
def test_a_fresh_text_query_makes_at_most_two_statements(counted, model, mode, features):
    settings, library, statements = counted
    settings = settings.model_copy(update={"itm_features": features})
    searcher, service = Searcher(model, library, settings), QueryService(settings, model, library)
    for i, query in enumerate(["a photo on the beach", "beach at dusk -snow"]):
        statements.clear()
        result = searcher.search(query, k=5, mode=mode)
        assert result.hits and len(statements) <= 2 + ("-" in query), statements  # an exclusion: one more
        statements.clear()
        page = asyncio.run(service.search_text(SearchRequest.checked(f"{query} {i}", settings, k=5, mode=mode)))
        assert page.hits and len(statements) <= 2 + ("-" in query), statements


def test_many_concurrent_queries_share_the_model_and_never_wait_on_each_other_forever(counted, model):
    # More queries at once than the event loop has worker threads: each waits in one for its
    # encoding, which the batcher's own thread makes (a shared pool would deadlock here).
    settings, library, _ = counted
    service = QueryService(settings, model, library)

    async def many():
        pages = [
            service.search_text(SearchRequest.checked(f"beach {i}", settings, k=3, rerank=0, mode="semantic"))
            for i in range(40)
        ]
        return await asyncio.wait_for(asyncio.gather(*pages), 60)

    pages = asyncio.run(many())
    assert all(p.hits and p.fresh for p in pages)
    # The same query again is a kept ranking: no model call, no ranking work.
    again = asyncio.run(service.search_text(SearchRequest.checked("beach 3", settings, k=3, rerank=0, mode="semantic")))
    assert not again.fresh and again.timings_ms["encode"] == 0.0 and [h.image_id for h in again.hits] == [h.image_id for h in pages[3].hits]
