"""A word the whole library shares decides nothing in hybrid search.

Every image carries its library root's name as a search word. Under a root named `pictures`,
the query "a picture of a red dog" matches every image by "picture": before keyword weights
came from how informative a word is, that flat keyword list (all images, in id order) was
fused with the semantic candidates, filled the ITM slots and pushed the right images out.
The trained colour fixture of test_hybrid measures it: the same 24 pictures under a root
named `pictures` and under a neutral one, queried "a picture of <colour> <animal>".
"""

from __future__ import annotations

import numpy as np
import pytest

from indexer.pipeline import Indexer
from searchengine.library import Library
from searchengine.models import RetrievalModel
from searchengine.search import Searcher
from searchengine.settings import Settings
from searchengine.textindex import clause_weight
from tests.searchengine.test_hybrid import ANIMALS, average_precision
from tests.trained import COLOURS, colour_picture, train_colour_model


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    root = tmp_path_factory.mktemp("common-words")
    model_dir = train_colour_model(root / "model")
    model = RetrievalModel.load(str(model_dir), device="cpu", dtype="float32")
    out = {}
    for name in ("pictures", "pets"):
        folder = root / name / name  # the root's own name is a search word of every image
        folder.mkdir(parents=True)
        rng = np.random.default_rng(7)
        truth: dict[tuple[str, str], set[str]] = {}
        n = 0
        for colour in COLOURS:
            for animal in ANIMALS:
                for _ in range(2):
                    n += 1
                    path = folder / f"{animal}_{n:02d}.png"
                    colour_picture(colour, rng, size=64).save(path)
                    truth.setdefault((colour, animal), set()).add(str(path))
        settings = Settings(data_dir=root / name / "data", model=str(model_dir), device="cpu", dtype="float32", batch_size=8)
        library = Library.open(settings, create=True)
        Indexer(model, library, settings).run([folder])
        out[name] = (Searcher(model, library, settings), truth)
    yield out
    for searcher, _ in out.values():
        searcher.library.close()


def mean_ap(searcher, truth, mode: str) -> float:
    aps = []
    for (colour, animal), relevant in truth.items():
        hits = searcher.search(f"a picture of a {colour} {animal}", k=24, mode=mode).hits
        aps.append(average_precision([h.path for h in hits], relevant))
    return float(np.mean(aps))


def test_a_root_name_every_image_shares_does_not_decide_the_ranking(libraries):
    maps = {root: {mode: mean_ap(*libraries[root], mode) for mode in ("semantic", "hybrid")} for root in libraries}
    print("mean average precision, 'a picture of a <colour> <animal>':", maps)
    assert maps["pictures"]["hybrid"] >= maps["pictures"]["semantic"]
    assert maps["pictures"]["hybrid"] >= maps["pets"]["hybrid"] - 0.02
    assert maps["pets"]["hybrid"] >= 0.95  # the animal word still does its job


def test_the_shared_word_carries_no_weight_and_the_rare_one_all(libraries):
    searcher, truth = libraries["pictures"]
    hits = searcher.search("picture dog", k=24, mode="keyword").hits
    dogs = set().union(*(truth[(c, "dog")] for c in COLOURS))
    n = len(dogs)  # 8 of 24: "dog" narrows the library; "picture" (all 24) does not
    assert {h.path for h in hits[:n]} == dogs and all(h.keyword == pytest.approx(1.0) for h in hits[:n])
    assert all(h.keyword == pytest.approx(0.0) for h in hits[n:])
    hybrid = searcher.search("picture", k=24, mode="hybrid")
    assert all(h.keyword is None for h in hybrid.hits)  # nothing but the shared word: no keyword side


def test_clause_weight_follows_how_much_of_the_library_a_word_narrows_to():
    assert clause_weight(0, 1000) == 1.0 and clause_weight(10, 1000) == 1.0 and clause_weight(500, 1000) == 1.0
    assert clause_weight(1000, 1000) == 0.0
    assert 0.0 < clause_weight(900, 1000) < clause_weight(700, 1000) < 1.0
