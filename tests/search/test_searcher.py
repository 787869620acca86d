"""The Searcher reads: making one writes nothing to the store, and it still refuses an index
built with another model."""

from __future__ import annotations

import shutil

import pytest

from searchengine.errors import ModelMismatchError
from searchengine.indexing.pipeline import Indexer
from searchengine.library import Library
from searchengine.models.retrieval import RetrievalModel
from searchengine.models.tiny import build_tiny_model
from searchengine.search.searcher import Searcher


def test_a_searcher_on_an_empty_index_records_no_model(settings, model):
    with Library.open(settings, create=True) as library:
        revision = library.store.revision()
        searcher = Searcher(model, library, settings)
        assert searcher.search("a dog", k=3).hits == []
        assert library.store.model_info() is None  # the first indexing run records its model
        assert library.store.revision() == revision


def test_a_searcher_writes_nothing_and_refuses_another_model(settings, model, photo_files, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photo_files[:2]:
        shutil.copy(p, folder / p.name)
    with Library.open(settings, create=True) as library:
        Indexer(model, library, settings).run([folder])
        recorded, revision = library.store.model_info(), library.store.revision()
        assert len(Searcher(model, library, settings).search("a dog", k=3).hits) == 2
        assert library.store.model_info() == recorded and library.store.revision() == revision
        other = RetrievalModel.load(str(build_tiny_model(tmp_path / "other", seed=1)), device="cpu", dtype="float32")
        with pytest.raises(ModelMismatchError, match="another checkpoint"):
            Searcher(other, library, settings)
        assert library.store.model_info() == recorded
