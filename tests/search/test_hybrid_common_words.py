"""A word the whole library shares decides nothing in hybrid search.

Every image carries its library root's name as a search word. Under a root named `pictures`,
the query "a picture of a red animal" matches every image by "picture" and by nothing else:
before keyword weights came from how informative a word is, that flat keyword list (the whole
library, in id order) was fused with the semantic candidates, the images early in both lists
filled the ITM slots, and re-ranked images rank first, so the right ones were pushed down.
The trained colour model of test_hybrid measures it: the same 96 pictures (24 per colour,
more than the 20 ITM slots) under a root named `pictures` and under a neutral one.
"""

from __future__ import annotations

import numpy as np
import pytest

from searchengine.indexing.pipeline import Indexer
from searchengine.library import Library
from searchengine.models.retrieval import RetrievalModel
from searchengine.search import Searcher
from searchengine.config.settings import Settings
from searchengine.store.textindex import clause_weight
from tests.search.test_hybrid import ANIMALS, average_precision
from tests.trained import COLOURS, colour_picture

PER_COLOUR = 24


@pytest.fixture(scope="module")
def libraries(tmp_path_factory, colour_model_dir):
    root = tmp_path_factory.mktemp("common-words")
    model_dir = colour_model_dir
    model = RetrievalModel.load(str(model_dir), device="cpu", dtype="float32")
    out = {}
    for name in ("pictures", "pets"):
        folder = root / name / name  # the root's own name is a search word of every image
        folder.mkdir(parents=True)
        rng = np.random.default_rng(7)
        by_colour: dict[str, set[str]] = {c: set() for c in COLOURS}
        by_animal: dict[str, set[str]] = {a: set() for a in ANIMALS}
        for n in range(PER_COLOUR * len(COLOURS)):
            colour, animal = list(COLOURS)[n % len(COLOURS)], ANIMALS[n % len(ANIMALS)]
            path = folder / f"img_{n:03d}_{animal}.png"  # ids interleave colours: id order says nothing
            colour_picture(colour, rng, size=64).save(path)
            by_colour[colour].add(str(path))
            by_animal[animal].add(str(path))
        settings = Settings(data_dir=root / name / "data", model=str(model_dir), device="cpu", dtype="float32", batch_size=16)
        library = Library.open(settings, create=True)
        Indexer(model, library, settings).run([folder])
        out[name] = (Searcher(model, library, settings), by_colour, by_animal)
    yield out
    for searcher, _, _ in out.values():
        searcher.library.close()


def mean_ap(searcher, by_colour, mode: str) -> float:
    aps = []
    for colour, relevant in by_colour.items():
        hits = searcher.search(f"a picture of a {colour} animal", k=len(relevant) * 4, mode=mode).hits
        aps.append(average_precision([h.path for h in hits], relevant))
    return float(np.mean(aps))


def test_a_root_name_every_image_shares_does_not_decide_the_ranking(libraries):
    maps = {root: {mode: mean_ap(*libraries[root][:2], mode) for mode in ("semantic", "hybrid")} for root in libraries}
    print("mean average precision, 'a picture of a <colour> animal':", maps)
    assert maps["pictures"]["hybrid"] >= maps["pictures"]["semantic"]
    assert maps["pictures"]["hybrid"] >= maps["pets"]["hybrid"] - 0.02
    assert maps["pets"]["semantic"] >= 0.9  # the model sees colour: the fixture is not random


def test_the_shared_word_carries_no_weight_and_the_rare_one_all(libraries):
    searcher, _, by_animal = libraries["pictures"]
    hits = searcher.search("picture dog", k=96, mode="keyword").hits
    dogs = by_animal["dog"]
    n = len(dogs)  # a third of the library: "dog" narrows it; "picture" (all of it) does not
    assert {h.path for h in hits[:n]} == dogs and all(h.keyword == pytest.approx(1.0) for h in hits[:n])
    assert all(h.keyword == pytest.approx(0.0) for h in hits[n:])
    hybrid = searcher.search("picture", k=96, mode="hybrid")
    assert all(h.keyword is None for h in hybrid.hits)  # nothing but the shared word: no keyword side


def test_clause_weight_follows_how_much_of_the_library_a_word_narrows_to():
    assert clause_weight(0, 1000) == 1.0 and clause_weight(10, 1000) == 1.0 and clause_weight(500, 1000) == 1.0
    assert clause_weight(1000, 1000) == 0.0
    assert 0.0 < clause_weight(900, 1000) < clause_weight(700, 1000) < 1.0
