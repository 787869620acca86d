"""Keyword and hybrid search: file, folder and caption words, phrases, exclusions, and a
labelled fixture on which hybrid ranking beats both single modes.

The fixture: 24 noisy single-colour pictures, 4 colours x 3 animals x 2, filed as
`pets/<animal>_<n>.png`. What a picture *shows* is its colour, which only the (trained)
embedding model can see; what it *is of* is in its file name, which only the keyword side
can see. A query "red dog" is relevant to exactly the two red pictures named dog_*. Semantic
search finds the six red ones in an arbitrary order of animals, keyword search the six dogs in
an arbitrary order of colours; only fusing both puts the two right ones first.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from searchengine.indexing.pipeline import Indexer
from searchengine.errors import QueryError
from searchengine.library import Library
from searchengine.models.retrieval import RetrievalModel
from searchengine.search import Searcher
from searchengine.config.settings import Settings
from tests.trained import COLOURS, colour_picture

ANIMALS = ["dog", "cat", "bird"]


def average_precision(ranked: list[str], relevant: set[str]) -> float:
    hits, total = 0, 0.0
    for rank, path in enumerate(ranked, 1):
        if path in relevant:
            hits += 1
            total += hits / rank
    return total / len(relevant)


@pytest.fixture(scope="module")
def pets(tmp_path_factory, colour_model_dir):
    root = tmp_path_factory.mktemp("hybrid")
    model_dir = colour_model_dir
    folder = root / "pets"
    folder.mkdir()
    rng = np.random.default_rng(7)
    truth: dict[tuple[str, str], set[str]] = {}
    n = 0
    for colour in COLOURS:
        for animal in ANIMALS:
            for _ in range(2):
                n += 1
                path = folder / f"{animal}_{n:02d}.png"  # numbered across colours: the name says nothing of colour
                colour_picture(colour, rng, size=64).save(path)
                truth.setdefault((colour, animal), set()).add(str(path))
    settings = Settings(data_dir=root / "data", model=str(model_dir), device="cpu", dtype="float32", batch_size=8)
    model = RetrievalModel.load(str(model_dir), device="cpu", dtype="float32")
    library = Library.open(settings, create=True)
    Indexer(model, library, settings).run([folder])  # no captions: a random captioner would only add noise
    yield Searcher(model, library, settings), truth
    library.close()


def test_hybrid_beats_semantic_and_keyword_on_the_labelled_fixture(pets):
    searcher, truth = pets
    scores = {}
    for mode in ("semantic", "keyword", "hybrid"):
        aps = []
        for (colour, animal), relevant in truth.items():
            hits = searcher.search(f"{colour} {animal}", k=24, mode=mode).hits
            aps.append(average_precision([h.path for h in hits], relevant))
        scores[mode] = float(np.mean(aps))
    print("mean average precision over 12 queries:", {m: round(v, 3) for m, v in scores.items()})
    assert scores["hybrid"] > scores["semantic"] + 0.2
    assert scores["hybrid"] > scores["keyword"] + 0.2
    assert scores["hybrid"] >= 0.95


def test_semantic_side_of_the_fixture_sees_colour_and_keyword_side_sees_names(pets):
    searcher, truth = pets
    red = set().union(*(truth[("red", a)] for a in ANIMALS))
    dogs = set().union(*(truth[(c, "dog")] for c in COLOURS))
    assert {h.path for h in searcher.search("red", k=6, mode="semantic").hits} == red
    assert {h.path for h in searcher.search("dog", k=24, mode="keyword").hits} == dogs
    hybrid = searcher.search("red dog", k=24, mode="hybrid")
    assert hybrid.reranked == 20
    top = hybrid.hits[:2]
    assert {h.path for h in top} == truth[("red", "dog")]
    for h in top:  # final score: ITM + ITC + share of words matched ("dog" of "red dog")
        assert h.keyword == 0.5 and h.score == pytest.approx(h.itm + h.itc + 0.5, abs=1e-6)


def test_exclusions_apply_to_the_semantic_side_of_hybrid(pets):
    searcher, truth = pets
    hits = searcher.search("red -dog", k=24, mode="hybrid").hits
    paths = {h.path for h in hits}
    assert not paths & set().union(*(truth[(c, "dog")] for c in COLOURS))
    assert len(paths) == 16
    assert {h.path for h in hits[:4]} == truth[("red", "cat")] | truth[("red", "bird")]
    semantic = {h.path for h in searcher.search("red -dog", k=24, mode="semantic").hits}
    assert semantic == paths


# -- real photos, tiny random model: words in file names, folders and captions --------------


@pytest.fixture(scope="module")
def named(tmp_path_factory, photos_dir, tiny_model_dir, model, captioner):
    """Indexed (and captioned) once for the module: the tests below only search it."""
    root = tmp_path_factory.mktemp("named")
    lib = root / "Pictures"
    (lib / "Holidays 2023").mkdir(parents=True)
    (lib / "Garden").mkdir()
    jpgs = sorted(p for p in photos_dir.rglob("*.jpg"))
    settings = Settings(data_dir=root / "data", model=str(tiny_model_dir), device="cpu", dtype="float32", batch_size=4)
    shutil.copy(jpgs[0], lib / "Holidays 2023" / "SunflowerField.jpg")
    shutil.copy(jpgs[1], lib / "Holidays 2023" / "IMG_0042.jpg")
    for f in jpgs[2:8]:
        shutil.copy(f, lib / "Garden" / f.name)
    library = Library.open(settings, create=True)
    Indexer(model, library, settings, captioner=captioner).run([lib])
    yield Searcher(model, library, settings), lib
    library.close()


def test_keyword_finds_by_file_name_and_folder(named):
    searcher, lib = named
    hits = searcher.search("sunflower", k=10, mode="keyword").hits
    assert [h.path for h in hits] == [str(lib / "Holidays 2023" / "SunflowerField.jpg")]
    assert hits[0].keyword == 1.0 and hits[0].itm is None and hits[0].score == 1.0
    holiday = {h.path for h in searcher.search("holidays", k=10, mode="keyword").hits}
    assert holiday == {str(p) for p in (lib / "Holidays 2023").iterdir()}
    assert [h.path for h in searcher.search("img_0042", k=10, mode="keyword").hits] == [str(lib / "Holidays 2023" / "IMG_0042.jpg")]
    assert searcher.search("zebra", k=10, mode="keyword").hits == []


def test_phrases_and_exclusions_in_keyword_and_hybrid(named):
    searcher, lib = named
    garden = {str(p) for p in (lib / "Garden").iterdir()}
    for mode in ("keyword", "hybrid"):
        hits = searcher.search("holidays -sunflower", k=50, mode=mode).hits
        assert str(lib / "Holidays 2023" / "SunflowerField.jpg") not in {h.path for h in hits}
        assert hits[0].path == str(lib / "Holidays 2023" / "IMG_0042.jpg")
    assert {h.path for h in searcher.search('"holidays 2023"', k=50, mode="keyword").hits} == {
        str(p) for p in (lib / "Holidays 2023").iterdir()
    }
    assert searcher.search('"2023 holidays"', k=50, mode="keyword").hits == []  # order matters in a phrase
    hybrid = {h.path for h in searcher.search("flowers -garden", k=50, mode="hybrid").hits}
    assert hybrid and not hybrid & garden
    with pytest.raises(QueryError, match="only exclusions"):
        searcher.search("-garden", mode="hybrid")


def test_hybrid_brings_a_keyword_match_into_the_reranked_top(named):
    searcher, lib = named
    target = str(lib / "Holidays 2023" / "SunflowerField.jpg")
    semantic = [h.path for h in searcher.search("sunflower", k=50, mode="semantic", rerank=0).hits]
    hybrid = searcher.search("sunflower", k=50, mode="hybrid", rerank=3)
    top = hybrid.hits[:3]
    assert target in {h.path for h in top} and all(h.itm is not None for h in top)
    mine = next(h for h in top if h.path == target)
    assert mine.keyword == 1.0 and mine.score == pytest.approx(mine.itm + mine.itc + 1.0, abs=1e-6)
    assert [h.path for h in hybrid.hits].index(target) <= semantic.index(target)
    assert len(hybrid.hits) == len(semantic)  # the fusion adds no image twice
