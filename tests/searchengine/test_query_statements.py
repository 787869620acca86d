"""A fresh text query costs at most two statements in the store, in every mode, through the
CLI's path and the service's, with the ViT feature cache and without it."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from sqlalchemy import event

from indexer.pipeline import Indexer
from searchengine.library import Library
from searchengine.search import Filters, Searcher
from searchengine.service import QueryService


@pytest.fixture()
def counted(settings, model, photo_files, tmp_path):
    folder = tmp_path / "beach photos"
    folder.mkdir()
    for f in photo_files[:8]:
        shutil.copy(f, folder / f.name)
    settings = settings.model_copy(update={"refresh_interval_s": 3600})
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
        page = asyncio.run(service.search_text(f"{query} {i}", k=5, offset=0, rerank=True, min_score=None,
                                               filters=Filters(), mode=mode))
        assert page.hits and len(statements) <= 2 + ("-" in query), statements
