"""Combined queries (words plus liked and unliked example images) and the ITM cutoff
("only matches"), on the tiny model trained to see colour: the Searcher, the CLI and the API.

The fixture: 24 noisy single-colour pictures, six of each colour, named `p01.png`..`p24.png`
so that no file name says a colour: only the model sees it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from searchengine.indexing.pipeline import Indexer
from searchengine.app.api import create_app
from searchengine.errors import ImageNotFoundError, QueryError
from searchengine.library import Library
from searchengine.models.retrieval import RetrievalModel
from searchengine.search import Searcher, Steer, parse_example
from searchengine.config.settings import Settings
from tests.inprocess import run_cli
from tests.trained import COLOURS, colour_picture


@pytest.fixture(scope="module")
def colours(tmp_path_factory, colour_model_dir):
    root = tmp_path_factory.mktemp("combined")
    folder = root / "pics"
    folder.mkdir()
    rng = np.random.default_rng(11)
    colour_of: dict[str, str] = {}
    n = 0
    for colour in COLOURS:
        for _ in range(6):
            n += 1
            path = folder / f"p{n:02d}.png"
            colour_picture(colour, rng, size=64).save(path)
            colour_of[str(path)] = colour
    settings = Settings(data_dir=root / "data", model=str(colour_model_dir), device="cpu", dtype="float32", batch_size=8)
    model = RetrievalModel.load(str(colour_model_dir), device="cpu", dtype="float32")
    library = Library.open(settings, create=True)
    Indexer(model, library, settings).run([folder])
    searcher = Searcher(model, library, settings)
    by_colour: dict[str, list[int]] = {}
    for h in searcher.search("red", k=24, mode="semantic", rerank=0).hits:
        by_colour.setdefault(colour_of[h.path], []).append(h.image_id)
    yield searcher, colour_of, by_colour, settings, model
    library.close()


def colours_of(page, colour_of) -> list[str]:
    return [colour_of[h.path] for h in page.hits]


def test_liking_a_blue_picture_moves_blue_pictures_up(colours):
    searcher, colour_of, by_colour, *_ = colours
    plain = colours_of(searcher.search("red", k=24, mode="semantic"), colour_of)
    assert plain[:6] == ["red"] * 6  # the model sees colour
    blue_rank = np.mean([i for i, c in enumerate(plain) if c == "blue"])
    steered = colours_of(searcher.search("red", k=24, mode="semantic", steer=Steer.parse([by_colour["blue"][0]])), colour_of)
    steered_blue_rank = np.mean([i for i, c in enumerate(steered) if c == "blue"])
    assert steered_blue_rank < blue_rank - 3, (plain, steered)
    assert set(steered[:12]) == {"red", "blue"}  # the words still count: red and blue lead, no other colour
    half = colours_of(searcher.search("red", k=24, mode="semantic", steer=Steer.parse([f"{by_colour['blue'][0]}:0.1"])), colour_of)
    assert half[:6] == ["red"] * 6  # a light touch leaves the words in charge


def test_unliking_a_picture_removes_it_and_its_neighbours(colours):
    searcher, colour_of, by_colour, *_ = colours
    red = by_colour["red"][0]
    page = searcher.search("red", k=24, mode="semantic", steer=Steer.parse([], [red]))
    assert red not in [h.image_id for h in page.hits]
    assert "red" not in colours_of(page, colour_of)[:6]
    assert len(page.hits) == 23
    hybrid = searcher.search("red", k=24, mode="hybrid", steer=Steer.parse([], [red]))
    assert red not in [h.image_id for h in hybrid.hits]


def test_examples_alone_rank_by_itc_like_more_like_this(colours):
    searcher, colour_of, by_colour, *_ = colours
    page = searcher.search("", k=6, steer=Steer.parse([by_colour["green"][0], by_colour["green"][1]]))
    assert colours_of(page, colour_of) == ["green"] * 6
    assert page.reranked == 0 and page.strong is None and all(h.itm is None for h in page.hits)
    with pytest.raises(QueryError, match="empty"):
        searcher.search("", steer=Steer.parse([], [by_colour["green"][0]]))  # unliking alone says nothing to look for


def test_the_combined_vector_is_the_documented_formula(colours):
    searcher, _, by_colour, *_ = colours
    model, library = searcher.model, searcher.library
    t = model.embed_texts(["red"])[0].astype(np.float64)
    like, unlike = by_colour["blue"][0], by_colour["green"][0]

    def m(image_id):
        mean = library.vectors_of(image_id).astype(np.float64).mean(axis=0)
        return mean / np.linalg.norm(mean)

    expected = t + 0.5 * m(like) - 2.0 * m(unlike)
    expected /= np.linalg.norm(expected)
    got = searcher.steered_vector(model.embed_texts(["red"])[0], Steer.parse([f"{like}:0.5"], [f"{unlike}:2"]))
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_bad_examples_are_refused_with_a_reason(colours):
    searcher, _, by_colour, *_ = colours
    with pytest.raises(ImageNotFoundError, match="not in the index"):  # a 404 in the API: the id names nothing
        searcher.search("red", steer=Steer.parse(["999999"]))
    for bad in ("x", "4:", "4:-1", "4:nan", "0", "4:11"):
        with pytest.raises(QueryError):
            parse_example(bad)
    assert parse_example(" 4:0.25 ") == (4, 0.25)
    with pytest.raises(QueryError, match="both liked and unliked"):
        Steer.parse(["3"], ["3:2"])
    with pytest.raises(QueryError, match="keyword"):
        searcher.search("red", mode="keyword", steer=Steer.parse([by_colour["red"][0]]))
    one = by_colour["red"][0]
    with pytest.raises(QueryError, match="cancel"):
        searcher.steered_vector(None, Steer(((one, 1.0),), ((by_colour["red"][0], 1.0),)))


def test_min_itm_keeps_only_re_ranked_hits_at_or_above_it(colours):
    searcher, *_ = colours
    full = searcher.search("red", k=24, mode="semantic")
    itms = sorted(h.itm for h in full.hits if h.itm is not None)
    assert len(itms) == 20
    threshold = float(np.median(itms))  # a cut that keeps some and drops some
    kept_expected = sum(p >= threshold for p in itms)
    assert 0 < kept_expected < 20
    page = searcher.search("red", k=24, mode="semantic", min_itm=threshold)
    assert len(page.hits) == kept_expected and not page.has_more
    assert all(h.itm is not None and h.itm >= threshold for h in page.hits)
    assert page.strong == kept_expected
    # paging through the cut: pages join up to the whole, then stop
    first = searcher.search("red", k=3, mode="semantic", min_itm=threshold)
    assert first.has_more == (kept_expected > 3) and len(first.hits) == min(3, kept_expected)
    # without a cutoff, `strong` counts those at the classifier's boundary (0.5)
    assert full.strong == sum(p >= 0.5 for p in itms)
    assert searcher.search("red", k=5, mode="semantic", rerank=0).strong is None
    with pytest.raises(QueryError, match="probability"):
        searcher.search("red", min_itm=1.5)


@pytest.mark.dtype
def test_cli_like_unlike_and_min_itm(colours):
    searcher, colour_of, by_colour, settings, _ = colours
    env = {"SEARCHENGINE_DATA_DIR": str(settings.data_dir)}
    blue = by_colour["blue"][0]
    r = run_cli("search", "red", "--mode", "semantic", "-k", "24", "--like", str(blue), "--json", env=env)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    steered = [colour_of[x["path"]] for x in data["results"]]
    assert set(steered[:12]) == {"red", "blue"} and data["strong"] is not None
    r = run_cli("search", "--like", str(blue), "-k", "6", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert [colour_of[x["path"]] for x in json.loads(r.stdout)["results"]] == ["blue"] * 6
    r = run_cli("search", "red", "--mode", "semantic", "--unlike", str(by_colour["red"][0]), "-k", "3", env=env)
    assert r.returncode == 0 and "strong match" in r.stderr
    assert f"  {by_colour['red'][0]:>6}  " not in r.stdout  # the id column never shows the unliked image
    r = run_cli("search", "red", "--min-itm", "1", env=env)
    assert r.returncode == 0 and "no results" in r.stdout and "at least 1" in r.stdout
    r = run_cli("search", "red", "--like", "abc", env=env)
    assert r.returncode == 1 and "ID:WEIGHT" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("search", "red", "--min-itm", "2", env=env)
    assert r.returncode == 1 and "probability" in r.stderr


def test_api_like_unlike_min_itm_and_strong(colours):
    searcher, colour_of, by_colour, settings, model = colours
    app = create_app(settings.model_copy(update={"refresh_interval_s": 0}), loader=lambda s: (model, Library.open(s)))
    with TestClient(app) as client:
        from tests.app.test_api import wait_ready

        wait_ready(client)
        blue, red = by_colour["blue"][0], by_colour["red"][0]
        r = client.get("/api/search", params={"q": "red", "mode": "semantic", "k": 24, "like": [f"{blue}:1"]})
        assert r.status_code == 200, r.text
        got = [colour_of[h["path"]] for h in r.json()["hits"]]
        assert set(got[:12]) == {"red", "blue"}
        r = client.get("/api/search", params={"q": "red", "mode": "semantic", "k": 24, "unlike": [red]})
        assert red not in [h["id"] for h in r.json()["hits"]]
        r = client.get("/api/search", params={"q": "", "like": [blue], "k": 6})
        assert r.status_code == 200 and r.json()["mode"] == "semantic"
        assert [colour_of[h["path"]] for h in r.json()["hits"]] == ["blue"] * 6
        full = client.get("/api/search", params={"q": "red", "mode": "semantic", "k": 24}).json()
        itms = sorted(h["itm"] for h in full["hits"] if h["itm"] is not None)
        threshold = float(np.median(itms))
        cut = client.get("/api/search", params={"q": "red", "mode": "semantic", "k": 24, "min_itm": threshold}).json()
        assert cut["strong"] == len(cut["hits"]) == sum(p >= threshold for p in itms)
        assert full["strong"] == sum(p >= 0.5 for p in itms)
        for params, status in (
            ({"q": "red", "like": "abc"}, 422), ({"q": "red", "min_itm": 2}, 422), ({"q": "red", "like": 999999}, 404),
            ({"q": "", "unlike": red}, 400), ({"q": "red", "like": red, "unlike": red}, 400),
        ):
            r = client.get("/api/search", params=params)
            assert r.status_code == status, (params, r.text)
            assert r.json()["error"]


def test_the_re_ranked_request_after_an_itc_one_does_not_encode_the_query_again(colours):
    """Results that sharpen: rerank=0 first, then the default; the second reuses the vector."""
    from searchengine.search import RankingCache

    searcher, *_ = colours
    calls: list[str] = []

    def encode(text):
        calls.append(text)
        return searcher.model.embed_texts([text])[0]

    cache = RankingCache(8)
    fast = searcher.search("red", k=6, mode="semantic", rerank=0, encode=encode, rankings=cache)
    assert fast.reranked == 0 and calls == ["red"]
    sharp = searcher.search("red", k=6, mode="semantic", encode=encode, rankings=cache)
    assert calls == ["red"] and sharp.reranked == 20 and sharp.timings_ms["encode"] == 0.0
    assert sharp.hits == searcher.search("red", k=6, mode="semantic").hits  # as if asked at once
