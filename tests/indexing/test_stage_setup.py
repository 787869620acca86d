"""Every run sets its stages up one way (issue 28's two bugs): `reindex`, `eval` and the
fine-tune's ViT pass decode on the model's device under `decode = device` and take the
memory-sized batch on a GPU, as `index` does. The GPU is stood in for by the model's device
name and its memory-sized batch; the device decode's own check is recorded, not run."""

from __future__ import annotations

import pytest

from searchengine.indexing import stages
from searchengine.indexing.pipeline import Indexer
from searchengine.indexing.reindex import Reindexer
from searchengine.library import Library
from searchengine.tuning import evaluation


@pytest.fixture
def on_a_gpu(model, monkeypatch):
    built, checked = [], []

    class Recorded(stages.DecodeStage):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            built.append(self)

    monkeypatch.setattr(stages, "DecodeStage", Recorded)
    monkeypatch.setattr(model, "device", "cuda:0")
    monkeypatch.setattr(model, "index_batch", lambda captioner_bytes=0: 37)  # what 80 GB free would hold
    monkeypatch.setattr("searchengine.media.device_decode.check", lambda device: checked.append(device))
    return built, checked


def test_reindex_eval_and_index_decode_on_the_models_device_in_its_batches(model, settings, on_a_gpu):
    built, checked = on_a_gpu
    settings = settings.model_copy(update={"decode": "device", "batch_size": None})
    library = Library.open(settings, create=True)
    try:
        reindexer = Reindexer(model, library, settings)
        assert reindexer.batch_size == 37
        evaluation.decoder(model, settings)
        assert evaluation.batch_size(model, settings) == 37
        indexer = Indexer(model, library, settings)
        assert indexer.batch_size == 37
    finally:
        library.close()
    assert len(built) == 3
    assert [(s.decode, s.device) for s in built] == [("device", "cuda:0")] * 3
    assert {s.thumbnail_size for s in built} == {settings.thumbnail_size}
    assert checked == ["cuda:0"] * 3  # refused before any file is read where it cannot work
    assert stages.index_batch_size(model, settings.model_copy(update={"batch_size": 5})) == 5  # the setting wins
