"""Captions at index time, caption failures, and captioning an existing index later."""

from __future__ import annotations

import shutil
from dataclasses import asdict

import numpy as np
import pytest
import torch

from searchengine.indexing.report import Report
from searchengine.indexing.recaption import Recaptioner
from searchengine.models.captioner import Captioner
from searchengine.media.imageio import decode_image, read_file
from searchengine.library import Library
from searchengine.search import Searcher
from searchengine.models.tiny import build_tiny_captioner
from tests.indexing.test_pipeline import run


@pytest.fixture
def folder(tmp_path, photo_files):
    d = tmp_path / "photos"
    d.mkdir()
    for f in photo_files[:6]:
        shutil.copy(f, d / f.name)
    return d


def captions(settings) -> dict[str, dict]:
    """path -> the image's stored row."""
    library = Library.open(settings)
    try:
        out = {}
        for image_id in library.store.image_ids().tolist():
            d = library.catalog.image_detail(image_id)
            for f in d.files:
                out[f.path] = asdict(d)
        return out
    finally:
        library.close()


def reference_caption(captioner: Captioner, path: str) -> str:
    """What the model card's recipe writes for this file: processor, generate, decode."""
    image = decode_image(read_file(path), max_pixels=10**9).image
    inputs = captioner.processor(images=image, return_tensors="pt")
    with torch.no_grad():
        out = captioner.model.generate(**inputs, max_new_tokens=captioner.max_new_tokens, num_beams=captioner.num_beams)
    return captioner.processor.decode(out[0], skip_special_tokens=True).strip()


def test_index_time_captions_equal_generate_and_are_searchable(settings, model, captioner, folder):
    summary = run(settings, model, folder, captioner=captioner)
    assert summary.indexed == 6 and summary.captioned == 6 and summary.caption_failed == 0
    rows = captions(settings)
    for path, d in rows.items():
        assert d["caption"] == reference_caption(captioner, path)
        assert d["caption_model"] == captioner.name and d["caption_error"] is None
    # Every image can be found by the caption word that sets it most apart.
    library = Library.open(settings)
    try:
        searcher = Searcher(model, library, settings)
        all_words = [set(d["caption"].split()) for d in rows.values()]
        for path, d in rows.items():
            word = min(d["caption"].split(), key=lambda w: sum(w in ws for ws in all_words))
            hits = searcher.search(word, k=10, mode="keyword").hits
            assert path in {p for h in hits for p in h.paths}
            assert all(word in (h.caption or "").split() for h in hits)
    finally:
        library.close()


def test_an_image_that_fails_to_caption_keeps_its_embedding(settings, model, captioner, folder, monkeypatch):
    settings = settings.model_copy(update={"decode": "exact"})  # the poisoned pixels are a full decode's
    victim = sorted(folder.iterdir())[3]
    poison = captioner.preprocess([decode_image(read_file(str(victim)), max_pixels=10**9).image])[0]
    real = captioner.generate

    def generate(pixel_values):
        if any(torch.equal(p, poison) for p in pixel_values):
            raise RuntimeError("the caption model choked (simulated)")
        return real(pixel_values)

    monkeypatch.setattr(captioner, "generate", generate)
    errors = []
    summary = run(settings, model, folder, captioner=captioner, report=Report(caption_failed=lambda p, m: errors.append((p, m))))
    assert summary.indexed == 6 and summary.captioned == 5 and summary.caption_failed == 1
    assert errors == [(str(victim), "RuntimeError: the caption model choked (simulated)")]
    row = captions(settings)[str(victim)]
    assert row["caption"] is None and row["caption_model"] is None and "choked" in row["caption_error"]
    library = Library.open(settings)
    try:
        assert row["id"] in library.index.ids().tolist()  # embedded and searchable
        assert library.describe()["caption_failures"] == 1
        # `searchengine caption` retries it, and only it, once the model behaves.
        monkeypatch.setattr(captioner, "generate", real)
        again = Recaptioner(captioner, library, settings).run()
        assert (again.captioned, again.failed) == (1, 0)
    finally:
        library.close()
    assert captions(settings)[str(victim)]["caption"] == reference_caption(captioner, str(victim))


@pytest.mark.slow  # three captioning passes and a second captioner built
def test_an_existing_index_is_captioned_later_and_recaptioned_with_another_model(
    settings, model, captioner, folder, tmp_path
):
    run(settings, model, folder)  # no captioner: no captions
    assert all(d["caption"] is None for d in captions(settings).values())
    library = Library.open(settings)
    try:
        before = {int(i): v.copy() for ids, vecs in library.store.iter_vectors() for i, v in zip(ids, vecs)}
        revision = library.store.revision()
        first = Recaptioner(captioner, library, settings).run()
        assert (first.captioned, first.failed) == (6, 0)
        assert library.store.revision() > revision
        assert Recaptioner(captioner, library, settings).run().captioned == 0  # nothing left to do
        assert Recaptioner(captioner, library, settings).run(redo=True).captioned == 6
        after = {int(i): v for ids, vecs in library.store.iter_vectors() for i, v in zip(ids, vecs)}
        assert after.keys() == before.keys()
        for i in before:
            np.testing.assert_array_equal(after[i], before[i])  # no re-embedding
    finally:
        library.close()
    for path, d in captions(settings).items():
        assert d["caption"] == reference_caption(captioner, path) and d["caption_model"] == captioner.name

    other = Captioner.load(str(build_tiny_captioner(tmp_path / "blip2", kind="blip2", seed=4)), device="cpu",
                           dtype="float32", max_new_tokens=8)
    library = Library.open(settings)
    try:
        assert Recaptioner(other, library, settings).run().captioned == 6
    finally:
        library.close()
    for path, d in captions(settings).items():
        assert d["caption"] == reference_caption(other, path) and d["caption_model"] == other.name


def test_a_vanished_file_is_a_caption_failure_not_a_crash(settings, model, captioner, folder):
    run(settings, model, folder)
    victim = sorted(folder.iterdir())[0]
    victim.unlink()
    library = Library.open(settings)
    try:
        failed = []
        summary = Recaptioner(captioner, library, settings, report=Report(caption_failed=lambda p, m: failed.append(p))).run()
        assert (summary.captioned, summary.failed) == (5, 1) and failed == [str(victim)]
    finally:
        library.close()
    assert captions(settings)[str(victim)]["caption_error"] == "file vanished before it could be read"
