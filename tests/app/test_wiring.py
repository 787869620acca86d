"""Which models a command loads: the index's own by default, another one refused before loading."""

from __future__ import annotations

import shutil

import pytest

from searchengine.app import wiring
from searchengine.errors import ModelMismatchError, ModelLoadError
from searchengine.library import Library, Recorded
from searchengine.config.settings import DEFAULT_MODEL, Settings
from searchengine.models.tiny import build_tiny_model


@pytest.fixture
def recorded(settings, model) -> Recorded:
    from searchengine.library import model_info

    library = Library.open(settings, create=True)
    library.bind(model_info(model))
    library.record_captioner(True, "/captioners/blip")
    library.close()
    return Library.recorded(settings)


def test_a_new_index_gets_the_default_model(tmp_path):
    settings = Settings(data_dir=tmp_path / "none")
    assert Library.recorded(settings) is None
    assert wiring.retrieval_model(settings, None) == DEFAULT_MODEL


def test_an_index_remembers_its_model_and_captioner(settings, recorded, tiny_model_dir):
    bare = Settings(data_dir=settings.data_dir)  # no --model, no captioner named
    assert wiring.retrieval_model(bare, recorded) == str(tiny_model_dir)
    assert wiring.caption_model(bare, recorded) == "/captioners/blip"
    assert wiring.caption_model(bare.model_copy(update={"caption_model": "/other"}), recorded) == "/other"
    assert wiring.caption_model(bare.model_copy(update={"captions": False}), recorded) is None


def test_an_index_built_without_captions_stays_without_unless_asked(settings, recorded):
    library = Library.open(settings)
    library.record_captioner(False, None)
    library.close()
    again = Library.recorded(settings)
    bare = Settings(data_dir=settings.data_dir)
    assert wiring.caption_model(bare, again) is None
    assert wiring.caption_model(bare.model_copy(update={"captions": True}), again) is not None
    assert wiring.caption_model(bare, again, force=True) is not None  # `searchengine caption`


def test_the_same_weights_moved_elsewhere_are_accepted(settings, recorded, tiny_model_dir, tmp_path):
    moved = shutil.copytree(tiny_model_dir, tmp_path / "moved")
    assert wiring.retrieval_model(settings.model_copy(update={"model": str(moved)}), recorded) == str(moved)


def test_another_local_model_is_refused_before_loading(settings, recorded, tmp_path, monkeypatch):
    other = build_tiny_model(tmp_path / "other", seed=5)

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("searchengine.models.retrieval.RetrievalModel.load", no_loading)
    with pytest.raises(ModelMismatchError, match="is another checkpoint"):
        wiring.retrieval_model(settings.model_copy(update={"model": str(other)}), recorded)


def test_another_hub_model_is_refused_without_downloading_it(settings, recorded, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr("searchengine.models.hub.hub_unreachable_reason", no_network)
    with pytest.raises(ModelMismatchError) as e:
        wiring.retrieval_model(settings.model_copy(update={"model": "someone/another-model"}), recorded)
    assert "Leave out --model" in str(e.value)


def test_a_model_directory_that_moved_away_says_so(settings, recorded, tiny_model_dir, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.move(tiny_model_dir, moved)
    try:
        with pytest.raises(ModelLoadError, match="not there any more.*--model DIR"):
            wiring.retrieval_model(Settings(data_dir=settings.data_dir), Library.recorded(settings))
    finally:
        shutil.move(moved, tiny_model_dir)


def test_serving_loads_the_index_model_and_never_creates_an_index(settings, recorded, tmp_path, tiny_model_dir):
    from searchengine.errors import IndexNotFoundError

    model, library = wiring.open_for_serving(Settings(data_dir=settings.data_dir, device="cpu", dtype="float32"))
    try:
        assert model.name == str(tiny_model_dir)
    finally:
        library.close()
    typo = tmp_path / "typo"
    with pytest.raises(IndexNotFoundError):
        wiring.open_for_serving(Settings(data_dir=typo))
    assert not typo.exists()


def test_naming_a_captioner_asks_for_captions_decided_in_one_place(monkeypatch):
    """The rule was written in settings_from_args and again in wiring.captions_wanted; now
    `Settings.captions_on` holds it, and settings_from_args only lets a named captioner (a
    flag) outweigh SEARCHENGINE_CAPTIONS (the environment)."""
    import argparse

    from searchengine.config.settings import settings_from_args

    def wanted(recorded_on=None, **flags):
        args = argparse.Namespace(**{"captions": None, "caption_model": None, **flags})
        recorded = Recorded(None, (recorded_on, "m") if recorded_on is not None else None, ())
        return wiring.captions_wanted(settings_from_args(args), recorded)

    assert wanted() is True  # a new index: on
    assert wanted(recorded_on=False) is False  # as the index was captioned
    assert wanted(recorded_on=False, caption_model="blip") is True  # naming one asks for captions
    assert wanted(recorded_on=True, captions=False, caption_model="blip") is False  # --no-captions wins
    monkeypatch.setenv("SEARCHENGINE_CAPTIONS", "false")
    assert wanted() is False and wanted(recorded_on=True) is False
    assert wanted(caption_model="blip") is True  # the flag outweighs the environment
    monkeypatch.setenv("SEARCHENGINE_CAPTION_MODEL", "blip")
    assert wanted() is False  # both from the environment: captions off says it
    monkeypatch.delenv("SEARCHENGINE_CAPTIONS")
    assert Settings().captions_on(False) is True  # a captioner named in the environment asks too
    text = "".join(p.read_text() for p in __import__("pathlib").Path(wiring.__file__).parents[1].glob("**/*.py"))
    assert text.count("naming a captioner asks for captions") == 1
