"""The HTTP API through FastAPI's test client, over a real indexed folder and a tiny model."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import SecretStr

from searchengine.indexing.pipeline import Indexer
from searchengine.app.api import create_app
from searchengine.library import Library
from searchengine.media.thumbnails import checked_jpeg
from searchengine.search import image_similarity
from tests.images import bomb_png, gradient


def dated_jpeg(seed: int, when: str) -> bytes:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = when
    arr = np.roll(gradient(), seed * 7, axis=1)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def indexed(request, tmp_path_factory, photos_dir, tiny_model_dir, model, captioner):
    """The API's library, on each store backend: every test here runs on SQLite and on
    PostgreSQL (a server the tests start, tests/pg.py)."""
    from searchengine.config.settings import Settings

    database_url = request.getfixturevalue("postgres").new_database() if request.param == "postgresql" else None

    root = tmp_path_factory.mktemp("api")
    photos = root / "photos"
    shutil.copytree(photos_dir / "nature", photos / "nature")
    shutil.copytree(photos_dir / "abstract", photos / "abstract")
    (photos / "dated").mkdir()
    for i, when in enumerate(["1989:05:01 10:00:00", "1990:06:15 12:00:00", "1991:07:04 18:30:05"]):
        (photos / "dated" / f"d{i}.jpg").write_bytes(dated_jpeg(i, when))
    # Folders found by name (issue 16): nested, with spaces, and with LIKE's wildcards.
    for seed, rel in enumerate(FOLDER_FILES, 10):
        (photos / rel).parent.mkdir(parents=True, exist_ok=True)
        (photos / rel).write_bytes(dated_jpeg(seed, "2022:01:15 09:00:00"))
    (photos / "alpha").mkdir()
    (photos / "alpha" / "clear.png").write_bytes(_png(CLEAR))
    (photos / "alpha" / "half.png").write_bytes(_png(HALF))
    settings = Settings(
        data_dir=root / "data", model=str(tiny_model_dir), device="cpu", dtype="float32", batch_size=8,
        refresh_interval_s=0, text_batch_wait_ms=2, database_url=database_url,
    )
    library = Library.open(settings, create=True)
    Indexer(model, library, settings, captioner=captioner).run([photos])
    library.close()
    return settings, photos


FOLDER_FILES = [
    "Trips/Winter 2022/w0.jpg", "Trips/Winter 2022/day 2/w1.jpg", "archive/2022/Winter/w2.jpg",
    "odd/100%/p.jpg", "odd/x_y/u.jpg", "odd/xzy/z.jpg",
]
CLEAR = np.dstack([np.roll(gradient(), 30, axis=0), np.zeros((64, 96), np.uint8)])  # nothing shows
HALF = np.dstack([np.roll(gradient(), 50, axis=1), np.full((64, 96), 255, np.uint8)])
HALF[:, 48:, 3] = 0  # the right half shows nothing
HALF[:32, :48, 3] = 100  # the top left shows a little


def _png(rgba: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    return buf.getvalue()


def wait_ready(client: TestClient) -> None:
    for _ in range(300):
        if client.get("/healthz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(client.get("/healthz").json())


def make_client(settings, model, **overrides):
    settings = settings.model_copy(update=overrides)
    app = create_app(settings, loader=lambda s: (model, Library.open(s)))
    return TestClient(app)


@pytest.fixture(scope="module")
def client(indexed, model):
    settings, _ = indexed
    with make_client(settings, model) as c:
        wait_ready(c)
        yield c


def ids(resp) -> list[int]:
    return [h["id"] for h in resp.json()["hits"]]


# -- health -------------------------------------------------------------------------------


def test_healthz_is_503_until_the_model_is_loaded(indexed, model):
    settings, _ = indexed
    release = threading.Event()

    def slow_loader(s):
        release.wait(10)
        return model, Library.open(s)

    app = create_app(settings, loader=slow_loader)
    with TestClient(app) as c:
        r = c.get("/healthz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = c.get("/api/search", params={"q": "dog"})
        assert r.status_code == 503 and "loading" in r.json()["error"]
        release.set()
        wait_ready(c)
        assert c.get("/healthz").json() == {"status": "ok", "error": None}


def test_healthz_reports_a_failed_start(indexed):
    settings, _ = indexed
    from searchengine.errors import ModelLoadError

    def broken(s):
        raise ModelLoadError("model directory '/x' does not exist")

    with TestClient(create_app(settings, loader=broken)) as c:
        for _ in range(100):
            r = c.get("/healthz")
            if r.json()["status"] == "error":
                break
            time.sleep(0.02)
        assert r.status_code == 503 and "does not exist" in r.json()["error"]
        assert "does not exist" in c.get("/api/stats").json()["error"]


# -- text search --------------------------------------------------------------------------


def test_search_returns_hits_scores_urls_and_timings(client):
    r = client.get("/api/search", params={"q": "a yellow flower", "k": 5, "mode": "semantic"})
    assert r.status_code == 200
    body = r.json()
    assert body["query"] == "a yellow flower" and body["mode"] == "semantic" and body["k"] == 5 and body["offset"] == 0
    assert body["next_offset"] == 5 and body["reranked"] == 20
    assert set(body["timings_ms"]) == {"encode", "ann", "rerank", "total"}
    for h in body["hits"]:
        assert h["score"] == pytest.approx(h["itm"] + h["itc"], abs=1e-6)
        assert h["thumbnail_url"] == f"/api/images/{h['id']}/thumbnail"
        assert client.get(h["file_url"]).status_code == 200
    plain = client.get("/api/search", params={"q": "a yellow flower", "k": 5, "rerank": False, "mode": "semantic"}).json()
    assert plain["reranked"] == 0 and all(h["itm"] is None for h in plain["hits"])


def test_modes_keyword_hybrid_and_semantic(client, indexed):
    _, photos = indexed
    lady = str(photos / "nature" / "LadyBird.jpg")
    keyword = client.get("/api/search", params={"q": "ladybird", "mode": "keyword"}).json()
    assert keyword["mode"] == "keyword" and [h["path"] for h in keyword["hits"]] == [lady]
    assert keyword["hits"][0]["keyword"] == 1.0 and keyword["hits"][0]["itm"] is None and keyword["reranked"] == 0
    hybrid = client.get("/api/search", params={"q": "ladybird", "k": 50}).json()
    assert hybrid["mode"] == "hybrid"  # the default
    assert lady in [h["path"] for h in hybrid["hits"][: hybrid["reranked"]]]  # fused into the re-ranked top
    semantic = client.get("/api/search", params={"q": "ladybird", "k": 50, "mode": "semantic"}).json()
    assert all(h["keyword"] is None for h in semantic["hits"])
    assert {h["id"] for h in semantic["hits"]} == {h["id"] for h in hybrid["hits"]}  # one library, fused once
    excluded = client.get("/api/search", params={"q": "flower -yellowflower -nature", "k": 50}).json()
    assert excluded["hits"] and not any("/nature/" in h["path"] for h in excluded["hits"])
    bad = client.get("/api/search", params={"q": "dog", "mode": "fuzzy"})
    assert bad.status_code == 422 and "mode" in bad.json()["error"]
    only_excluded = client.get("/api/search", params={"q": "-dog", "mode": "keyword"})
    assert only_excluded.status_code == 400 and "no words" in only_excluded.json()["error"]


def test_pages_neither_overlap_nor_skip(client):
    total = client.get("/api/stats").json()["images"]
    whole = ids(client.get("/api/search", params={"q": "green meadow", "k": total}))
    assert len(whole) == total
    paged, offset = [], 0
    while offset is not None:
        body = client.get("/api/search", params={"q": "green meadow", "k": 4, "offset": offset}).json()
        paged += [h["id"] for h in body["hits"]]
        offset = body["next_offset"]
    assert paged == whole and len(set(paged)) == total


def test_min_score_cuts_off(client):
    hits = client.get("/api/search", params={"q": "sand dune", "k": 50}).json()["hits"]
    cutoff = hits[len(hits) // 2]["score"]
    kept = client.get("/api/search", params={"q": "sand dune", "k": 50, "min_score": cutoff}).json()
    assert kept["hits"] and all(h["score"] >= cutoff for h in kept["hits"])
    assert len(kept["hits"]) < len(hits) and kept["next_offset"] is None


def test_folder_and_date_filters(client, indexed):
    _, photos = indexed
    folder = str(photos / "abstract")
    r = client.get("/api/search", params={"q": "waves", "k": 50, "folder": folder}).json()
    n_abstract = len(list((photos / "abstract").iterdir()))
    assert len(r["hits"]) == n_abstract and all(h["path"].startswith(folder + "/") for h in r["hits"])
    r = client.get("/api/search", params={"q": "waves", "k": 50, "taken_after": "1990-01-01", "taken_before": "1990-12-31"}).json()
    assert [h["taken_at"] for h in r["hits"]] == ["1990-06-15T12:00:00"]
    r = client.get("/api/search", params={"q": "waves", "k": 50, "taken_after": "1990-06-15", "taken_before": "1999-01-01"}).json()
    assert sorted(h["taken_at"] for h in r["hits"]) == ["1990-06-15T12:00:00", "1991-07-04T18:30:05"]
    r = client.get("/api/search", params={"q": "waves", "k": 50, "taken_before": "1989-05-01"}).json()
    assert [h["taken_at"] for h in r["hits"]] == ["1989-05-01T10:00:00"]  # the end day is inclusive
    r = client.get("/api/search", params={"q": "waves", "k": 50, "taken_before": "1990-06-15T11:59:59"}).json()
    assert [h["taken_at"] for h in r["hits"]] == ["1989-05-01T10:00:00"]
    assert client.get("/api/search", params={"q": "waves", "taken_after": "yesterday"}).status_code == 422
    bad = client.get("/api/search", params={"q": "waves", "taken_after": "2021-01-01", "taken_before": "2020-01-01"})
    assert bad.status_code == 400 and "later" in bad.json()["error"]


def test_folder_filter_takes_a_name_a_relative_path_or_a_home_path(client, indexed, monkeypatch):
    _, photos = indexed

    def found(folder: str, **params) -> list[str]:
        r = client.get("/api/search", params={"q": "photo", "k": 200, "folder": folder, **params})
        assert r.status_code == 200, (folder, r.json())
        return sorted(h["path"] for h in r.json()["hits"])

    def under(*rels: str) -> list[str]:
        return sorted(str(photos / r) for r in rels)

    winter = under("Trips/Winter 2022/w0.jpg", "Trips/Winter 2022/day 2/w1.jpg")
    assert found(str(photos / "Trips")) == winter  # an absolute path, as before
    assert found(str(photos / "Trips") + "/") == winter
    assert found("Winter 2022") == winter  # a bare name: anywhere in the library, subfolders too
    assert found("winter 2022/") == winter  # any case, a trailing slash is fine
    assert found("Trips/Winter 2022") == winter  # the last parts of a path
    assert found("2022/Winter") == under("archive/2022/Winter/w2.jpg")
    assert found("Winter") == under("archive/2022/Winter/w2.jpg")  # whole names: not "Winter 2022"
    assert found("day 2") == under("Trips/Winter 2022/day 2/w1.jpg")
    # LIKE's wildcards are plain characters in a folder name.
    assert found("100%") == under("odd/100%/p.jpg")
    assert found("x_y") == under("odd/x_y/u.jpg")  # not xzy
    # The home folder is expanded on the server.
    monkeypatch.setenv("HOME", str(photos.parent))
    assert found("~/photos/Trips") == winter
    assert len(found("~")) == client.get("/api/stats").json()["images"]
    # The keyword side filters the same way ("winter" is also a word of archive/2022/Winter).
    assert found("Trips", q="winter", mode="keyword") == winter


@pytest.mark.parametrize("folder", ["Winter 2023", "1%", "x%", "w0.jpg", "/nowhere/Trips", "Winter 2022/x", "../photos"])
def test_a_folder_filter_matching_no_folder_is_a_404_that_says_how_to_write_one(client, indexed, folder):
    """Not found, as an unknown image id is (schemathesis called the 400 a valid request
    refused), with the nearest indexed folder when one is near; '..' is a 400 (it cannot name one)."""
    _, photos = indexed
    hit = client.get("/api/search", params={"q": "photo", "k": 1}).json()["hits"][0]
    requests = [
        lambda: client.get("/api/search", params={"q": "photo", "folder": folder}),
        lambda: client.get("/api/search", params={"q": "photo", "folder": folder, "mode": "keyword"}),
        lambda: client.get(f"/api/images/{hit['id']}/similar", params={"folder": folder}),
        lambda: client.post("/api/search/image", params={"folder": folder},
                            files={"image": ("x.jpg", dated_jpeg(1, "2000:01:01 00:00:00"), "image/jpeg")}),
        lambda: client.get("/api/facets", params={"folder": folder}),
    ]
    for request in requests:
        r = request()
        message = r.json()["error"]
        if ".." in folder:
            assert r.status_code == 400 and "'..'" in message, message
            continue
        assert r.status_code == 404, message
        assert f"no indexed folder matches {folder!r}" in message
        assert "absolute path" in message and "~/" in message and "name" in message
        if folder == "Winter 2023":
            assert f"did you mean {str(photos / 'Trips/Winter 2022')!r}?" in message, message


def test_similar_and_image_search_take_a_folder_name(client, indexed):
    _, photos = indexed
    winter = {str(photos / "Trips/Winter 2022/w0.jpg"), str(photos / "Trips/Winter 2022/day 2/w1.jpg")}
    hit = client.get("/api/search", params={"q": "w0", "mode": "keyword", "folder": "Trips"}).json()["hits"][0]
    similar = client.get(f"/api/images/{hit['id']}/similar", params={"folder": "winter 2022"}).json()["hits"]
    assert {h["path"] for h in similar} == winter - {hit["path"]}
    upload = client.post("/api/search/image", params={"folder": "Winter 2022"},
                         files={"image": ("w0.jpg", open(hit["path"], "rb").read(), "image/jpeg")}).json()["hits"]
    assert {h["path"] for h in upload} == winter and upload[0]["path"] == hit["path"]


def test_folders_lists_subfolders_with_image_counts(client, indexed):
    _, photos = indexed
    everything = client.get("/api/folders", params={"limit": 1000}).json()
    got = {f["path"]: f["images"] for f in everything["folders"]}
    assert everything["total"] == len(got)
    assert got[str(photos)] == client.get("/api/stats").json()["images"]
    assert got[str(photos / "Trips")] == got[str(photos / "Trips/Winter 2022")] == 2
    assert got[str(photos / "Trips/Winter 2022/day 2")] == 1 and got[str(photos / "nature")] > 5
    assert not any(p in got for p in (str(photos.parent), "/"))  # nothing above the library's root
    # A folder's count is what the folder filter finds.
    for path in (str(photos / "Trips"), str(photos / "odd"), str(photos / "archive/2022")):
        hits = client.get("/api/search", params={"q": "photo", "k": 200, "folder": path}).json()["hits"]
        assert len(hits) == got[path], path
    # What the user typed, anywhere in the path, in any case; folders named so first.
    r = client.get("/api/folders", params={"q": "WINTER"}).json()
    assert [f["path"] for f in r["folders"]] == [
        str(photos / "Trips/Winter 2022"), str(photos / "archive/2022/Winter"), str(photos / "Trips/Winter 2022/day 2")
    ]
    r = client.get("/api/folders", params={"q": "winter", "limit": 1}).json()
    assert len(r["folders"]) == 1 and r["total"] == 3
    assert [f["path"] for f in client.get("/api/folders", params={"q": "%"}).json()["folders"]] == [str(photos / "odd/100%")]
    assert client.get("/api/folders", params={"q": "no such folder"}).json() == {"folders": [], "total": 0}
    assert client.get("/api/folders", params={"limit": 0}).status_code == 422


@pytest.mark.parametrize(
    "params, status, words",
    [
        ({"q": ""}, 400, "empty"),
        ({"q": "   "}, 422, "no words to look for"),  # the schema says so: a letter or digit
        ({"q": "dog " * 400}, 400, "limit"),
        ({}, 422, "q"),
        ({"q": "dog", "k": 0}, 422, "k"),
        ({"q": "dog", "k": 201}, 422, "k"),
        ({"q": "dog", "offset": -1}, 422, "offset"),
        ({"q": "dog", "min_score": "high"}, 422, "min_score"),
    ],
)
def test_bad_search_requests_are_4xx_with_a_message(client, params, status, words):
    r = client.get("/api/search", params=params)
    assert r.status_code == status and words in r.json()["error"]


# -- image search -------------------------------------------------------------------------


def test_image_similarity_definition():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 16)).astype(np.float32)
    a /= np.linalg.norm(a, axis=-1, keepdims=True)
    others = rng.standard_normal((5, 8, 16)).astype(np.float32)
    others /= np.linalg.norm(others, axis=-1, keepdims=True)
    want = [np.mean([max(a[i] @ o[j] for j in range(8)) for i in range(8)]) for o in others]
    np.testing.assert_allclose(image_similarity(a, others), want, atol=1e-6)
    assert image_similarity(a, a[None])[0] == pytest.approx(1.0, abs=1e-6)


def _brute_force_similar(settings, vectors, exclude=None):
    library = Library.open(settings)
    ids, stored = next(library.store.iter_vectors(chunk=10_000))
    library.close()
    scores = image_similarity(vectors, stored)
    order = [int(i) for i in ids[np.lexsort((ids, -scores))] if i != exclude]
    return order, dict(zip(ids.tolist(), scores.tolist()))


def test_similar_equals_brute_force_and_leaves_itself_out(client, indexed):
    settings, _ = indexed
    image_id = ids(client.get("/api/search", params={"q": "ladybird", "k": 1}))[0]
    r = client.get(f"/api/images/{image_id}/similar", params={"k": 200}).json()
    library = Library.open(settings)
    vectors = next(library.store.iter_vectors([image_id]))[1][0]
    library.close()
    order, scores = _brute_force_similar(settings, vectors, exclude=image_id)
    assert ids_of(r) == order
    for h in r["hits"]:
        assert h["score"] == pytest.approx(scores[h["id"]], abs=1e-5) and h["itm"] is None
    assert client.get("/api/images/999999/similar").status_code == 404


def ids_of(body) -> list[int]:
    return [h["id"] for h in body["hits"]]


def test_upload_finds_the_same_image_first(client, indexed):
    _, photos = indexed
    f = sorted((photos / "nature").iterdir())[2]
    r = client.post("/api/search/image", files={"image": (f.name, f.read_bytes(), "image/jpeg")}, params={"k": 3})
    assert r.status_code == 200
    top = r.json()["hits"][0]
    # An upload is decoded at a reduced JPEG scale, straight to the model's size (memory):
    # its vectors are within 1e-4 of the indexed copy's, not bit-equal.
    assert top["path"] == str(f) and top["score"] == pytest.approx(1.0, abs=2e-3)  # float16 vectors


@pytest.mark.parametrize(
    "data, status, words",
    [
        (b"just some text, not a picture", 400, "not an image"),
        (b"", 400, "empty"),
        (None, 400, "truncated"),  # filled in below: the first third of a real JPEG
        (bomb_png(), 413, "over the limit"),
    ],
)
def test_bad_uploads_are_4xx(client, indexed, data, status, words):
    _, photos = indexed
    if data is None:
        real = sorted((photos / "nature").iterdir())[0].read_bytes()
        data = real[: len(real) // 3]
    r = client.post("/api/search/image", files={"image": ("x.jpg", data, "image/jpeg")})
    assert r.status_code == status and words in r.json()["error"], r.json()


def test_upload_limits_and_missing_field(indexed, model, client):
    settings, photos = indexed
    assert client.post("/api/search/image").status_code == 422
    big = sorted((photos / "nature").iterdir())[0].read_bytes()
    with make_client(settings, model, max_upload_bytes=1000, max_upload_pixels=1000) as c:
        wait_ready(c)
        r = c.post("/api/search/image", files={"image": ("x.jpg", big, "image/jpeg")})
        assert r.status_code == 413 and "bytes" in r.json()["error"]
        small = io.BytesIO()
        Image.fromarray(gradient()).save(small, "PNG")  # 96x64 = 6144 pixels > 1000
        r = c.post("/api/search/image", files={"image": ("x.png", small.getvalue(), "image/png")})
        assert r.status_code == 413 and "pixels" in r.json()["error"]


# -- images -------------------------------------------------------------------------------


def test_image_metadata_thumbnail_and_file(client, indexed, captioner):
    settings, photos = indexed
    hit = client.get("/api/search", params={"q": "flower", "k": 1}).json()["hits"][0]
    meta = client.get(f"/api/images/{hit['id']}").json()
    assert meta["paths"] == [hit["path"]] and meta["files"][0]["size"] > 0
    assert (meta["width"], meta["height"]) == (hit["width"], hit["height"])
    assert meta["caption"] == hit["caption"] and meta["caption"]  # made at index time
    assert meta["caption_model"] == captioner.name and meta["caption_error"] is None
    t = client.get(meta["thumbnail_url"])
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(t.content))
    assert max(thumb.size) == settings.thumbnail_size
    assert len(t.content) < (photos / "nature").stat().st_size + 200_000
    assert any(settings.thumbnails_dir.rglob(f"{hit['id']}.jpg"))  # made once, kept
    f = client.get(meta["file_url"])
    assert f.status_code == 200 and f.content == open(hit["path"], "rb").read()
    expected = "image/png" if hit["path"].endswith(".png") else "image/jpeg"
    assert f.headers["content-type"] == expected


def test_preview_is_screen_sized_made_once_and_kept(client, indexed):
    settings, photos = indexed
    big = photos / "abstract" / "Elephants_5640x3172.jpg"  # 16 MB: the example
    hits = client.get("/api/search", params={"q": "elephants", "k": 200, "mode": "keyword"}).json()["hits"]
    hit = next(h for h in hits if h["path"] == str(big))
    assert hit["preview_url"] == f"/api/images/{hit['id']}/preview"
    assert client.get(f"/api/images/{hit['id']}").json()["preview_url"] == hit["preview_url"]
    r = client.get(hit["preview_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    preview = Image.open(io.BytesIO(r.content))
    assert max(preview.size) == settings.preview_size == 1600
    assert abs(preview.size[0] / preview.size[1] - 5640 / 3172) < 0.01
    assert len(r.content) < big.stat().st_size / 20
    kept = settings.previews_dir / f"{hit['id'] % 256:02x}" / f"{hit['id']}.jpg"
    assert checked_jpeg(kept.read_bytes()) == r.content and client.get(hit["preview_url"]).content == r.content
    # A small image is not enlarged.
    small = client.get("/api/search", params={"q": "d0", "mode": "keyword", "folder": "dated"}).json()["hits"][0]
    assert Image.open(io.BytesIO(client.get(small["preview_url"]).content)).size == (96, 64)


@pytest.mark.parametrize("damage", ["random", "empty", "cut short", "one byte flipped"])
def test_a_damaged_thumbnail_or_preview_is_made_again_not_served(client, indexed, damage):
    """From outside, random bytes and 0-byte files in thumbnails/ and previews/ were served as
    200, even after a restart. Each kept JPEG carries a checksum: a damaged one is made again."""
    settings, _ = indexed
    hit = client.get("/api/search", params={"q": "photo", "k": 1}).json()["hits"][0]
    for url, folder in ((hit["thumbnail_url"], settings.thumbnails_dir), (hit["preview_url"], settings.previews_dir)):
        good = client.get(url).content
        kept = folder / f"{hit['id'] % 256:02x}" / f"{hit['id']}.jpg"
        raw = kept.read_bytes()
        broken = {"random": os.urandom(len(raw)), "empty": b"", "cut short": raw[: len(raw) // 2],
                  "one byte flipped": raw[:100] + bytes([raw[100] ^ 1]) + raw[101:]}[damage]
        kept.write_bytes(broken)
        r = client.get(url)
        assert r.status_code == 200, (url, damage)
        again, before = (np.asarray(Image.open(io.BytesIO(b)).convert("RGB")).astype(int) for b in (r.content, good))
        assert again.shape == before.shape and np.abs(again - before).mean() < 3, (url, damage)  # the same picture
        assert checked_jpeg(kept.read_bytes()) == r.content == client.get(url).content  # kept again, served from there


def test_a_file_where_the_thumbnails_folder_should_be_is_no_500(client, indexed):
    """`thumbnails/` replaced by a file gave a 500: it is moved aside and the folder made again."""
    settings, _ = indexed
    hit = client.get("/api/search", params={"q": "photo", "k": 1}).json()["hits"][0]
    good = client.get(hit["thumbnail_url"]).content
    shutil.rmtree(settings.thumbnails_dir)
    settings.thumbnails_dir.write_bytes(b"not a folder")
    r = client.get(hit["thumbnail_url"])
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == Image.open(io.BytesIO(good)).size
    assert settings.thumbnails_dir.is_dir() and settings.thumbnails_dir.with_name("thumbnails.not-a-folder").is_file()


def test_transparent_images_show_on_grey_while_the_model_saw_white(client, indexed, model):
    settings, photos = indexed
    library = Library.open(settings)
    try:
        for name, rgba in [("clear", CLEAR), ("half", HALF)]:
            hit = client.get("/api/search", params={"q": name, "mode": "keyword", "folder": "alpha"}).json()["hits"][0]
            assert hit["path"] == str(photos / "alpha" / f"{name}.png")
            for url in (hit["thumbnail_url"], hit["preview_url"]):  # made at index time; on request
                shown = np.asarray(Image.open(io.BytesIO(client.get(url).content))).astype(int)
                see_through = shown if name == "clear" else shown[:, 52:]  # clear of the JPEG-blurred edge
                assert see_through.max() < 200 and see_through.min() > 60, (name, url)  # grey, not white
            # What the model embedded is exactly the white composite, as before.
            im = Image.fromarray(rgba, "RGBA")
            white = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
            stored = next(library.store.iter_vectors([hit["id"]]))[1][0]
            assert np.allclose(stored, model.embed_images([white]).itc[0], atol=1e-3)  # float16
            grey = Image.alpha_composite(Image.new("RGBA", im.size, (128, 128, 128, 255)), im).convert("RGB")
            assert not np.allclose(stored, model.embed_images([grey]).itc[0], atol=1e-3)  # the check can tell
    finally:
        library.close()


def test_unknown_ids_are_404(client):
    for url in ["/api/images/424242", "/api/images/424242/thumbnail", "/api/images/424242/preview", "/api/images/424242/file"]:
        r = client.get(url)
        assert r.status_code == 404 and "424242" in r.json()["error"]
    assert client.get("/api/images/abc").status_code == 422
    for url in ["/api/images/0", "/api/images/99999999999999999999999", "/api/images/99999999999999999999999/similar"]:
        assert client.get(url).status_code == 422, url  # out of id range: refused, not a 500


def test_files_are_served_by_id_only(client):
    # Path traversal is impossible by construction: no route takes a path, only integer ids;
    # the one exception is /static, the UI's own folder, which refuses paths outside it.
    for route in client.app.routes:
        for name, convertor in getattr(route, "param_convertors", {}).items():
            assert name == "image_id" or route.path == "/static", route.path
    for attempt in ["/static/../searchengine/api.py", "/static/..%2F..%2Fetc%2Fpasswd", "/static/%2e%2e/%2e%2e/etc/passwd"]:
        r = client.get(attempt)
        assert r.status_code == 404 and b"root:x:" not in r.content and b"import" not in r.content, attempt
    for attempt in ["/api/images/..%2F..%2Fetc%2Fpasswd/file", "/api/images/1%2F..%2F..%2Fetc%2Fpasswd/file",
                    "/api/images/-1/file", "/api/images/1/file?path=/etc/passwd"]:
        r = client.get(attempt)
        assert b"root:x:" not in r.content
        assert r.status_code in (404, 422) or attempt.endswith("?path=/etc/passwd")


def test_stats_and_metrics(client):
    stats = client.get("/api/stats").json()
    assert stats["images"] > 20 and stats["model"] and stats["bytes_on_disk"]["store"] > 0
    client.get("/api/search", params={"q": "metrics please", "k": 2})
    text = client.get("/metrics").text
    assert 'searchengine_requests_total{method="GET",route="/api/search",status="200"}' in text
    assert 'searchengine_stage_seconds_count{stage="encode"}' in text
    assert 'searchengine_stage_seconds_count{stage="rerank"}' in text
    assert f"searchengine_index_images {float(stats['images'])}" in text
    assert "searchengine_request_seconds_bucket" in text


def test_stats_is_a_typed_response(client):
    """/api/stats was an untyped dict: its schema said nothing of its fields."""
    spec = client.get("/openapi.json").json()
    ok = spec["paths"]["/api/stats"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/StatsOut"}
    fields = spec["components"]["schemas"]["StatsOut"]["properties"]
    stats = client.get("/api/stats").json()
    assert set(stats) == set(fields) and {"images", "failures", "backups", "vector_index", "server_paths_hidden"} <= set(fields)


def test_openapi_documents_every_endpoint(client):
    spec = client.get("/openapi.json").json()
    for path in ["/api/search", "/api/search/image", "/api/images/{image_id}", "/api/images/{image_id}/thumbnail",
                 "/api/images/{image_id}/preview", "/api/folders", "/api/images/{image_id}/file", "/api/images/{image_id}/similar", "/api/stats", "/healthz", "/metrics"]:
        assert path in spec["paths"], path
        for op in spec["paths"][path].values():
            assert op.get("description") or op.get("summary")
    params = {p["name"] for p in spec["paths"]["/api/search"]["get"]["parameters"]}
    assert params >= {"q", "k", "offset", "rerank", "mode", "min_score", "folder", "taken_after", "taken_before"}
    assert client.get("/docs").status_code == 200


# -- security -----------------------------------------------------------------------------


def test_api_key_protects_every_endpoint(indexed, model):
    settings, _ = indexed
    with make_client(settings, model, api_key=SecretStr("s3cret")) as c:
        for url in ["/healthz", "/api/search?q=dog", "/api/stats", "/metrics", "/docs", "/openapi.json", "/api/images/1/file"]:
            r = c.get(url)
            assert r.status_code == 401 and "API key" in r.json()["error"], url
        assert c.get("/healthz", headers={"X-API-Key": "wrong"}).status_code == 401
        for _ in range(200):
            if c.get("/healthz", headers={"X-API-Key": "s3cret"}).status_code == 200:
                break
            time.sleep(0.05)
        assert c.get("/api/search?q=dog", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/api/search?q=dog", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/api/search?q=dog&api_key=s3cret").status_code == 200  # for <img src>


def test_the_servers_own_paths_are_shown_only_to_the_key_holder_or_this_machine(indexed, model):
    settings, _ = indexed
    data_dir = str(settings.data_dir)

    def stats(c: TestClient, **headers) -> dict:
        if not headers:
            wait_ready(c)
        return c.get("/api/stats", headers=headers).json()

    # No key: a caller on another machine sees no data dir and only the model directory's name.
    with make_client(settings, model) as c:
        seen = stats(c)
        assert seen["data_dir"] is None and seen["store"] is None and seen["server_paths_hidden"] is True
        assert seen["model"] == os.path.basename(settings.model.rstrip("/")) and "/" not in seen["model"]
        assert data_dir not in json.dumps(seen)
    # No key, a caller on this machine: everything.
    app = create_app(settings, loader=lambda s: (model, Library.open(s)))
    with TestClient(app, client=("127.0.0.1", 50000)) as c:
        seen = stats(c)
        assert seen["data_dir"] == data_dir and seen["model"] == settings.model and seen["server_paths_hidden"] is False
    # A key: whoever gets past it holds it, from anywhere.
    with make_client(settings, model, api_key=SecretStr("s3cret")) as c:
        for _ in range(200):
            if c.get("/healthz", headers={"X-API-Key": "s3cret"}).status_code == 200:
                break
            time.sleep(0.05)
        assert c.get("/api/stats").status_code == 401
        seen = stats(c, **{"X-API-Key": "s3cret"})
        assert seen["data_dir"] == data_dir and seen["server_paths_hidden"] is False


def test_cors_is_off_unless_configured(client, indexed, model):
    origin = {"Origin": "https://elsewhere.example"}
    assert "access-control-allow-origin" not in client.get("/healthz", headers=origin).headers
    settings, _ = indexed
    with make_client(settings, model, cors_origins=["https://elsewhere.example"]) as c:
        r = c.get("/healthz", headers=origin)
        assert r.headers["access-control-allow-origin"] == "https://elsewhere.example"


# -- hot reload ---------------------------------------------------------------------------


def test_the_index_is_reloaded_while_serving(tmp_path, photo_files, tiny_model_dir, model):
    from searchengine.config.settings import Settings

    folder = tmp_path / "lib"
    folder.mkdir()
    for f in photo_files[:3]:
        shutil.copy(f, folder / f.name)
    settings = Settings(data_dir=tmp_path / "data", model=str(tiny_model_dir), device="cpu", dtype="float32", refresh_interval_s=0)

    def index() -> None:  # another process's indexer: its own library and FAISS copy
        library = Library.open(settings, create=True)
        Indexer(model, library, settings).run([folder])
        library.close()

    index()
    with make_client(settings, model) as c:
        wait_ready(c)
        assert len(ids(c.get("/api/search", params={"q": "tree", "k": 50}))) == 3
        new = folder / photo_files[5].name
        shutil.copy(photo_files[5], new)
        index()
        hits = c.get("/api/search", params={"q": "tree", "k": 50}).json()["hits"]
        assert len(hits) == 4 and str(new) in {h["path"] for h in hits}
        gone = folder / photo_files[0].name
        gone.unlink()
        index()
        hits = c.get("/api/search", params={"q": "tree", "k": 50}).json()["hits"]
        assert len(hits) == 3 and str(gone) not in {h["path"] for h in hits}
        assert c.get("/api/stats").json()["images"] == 3


def test_deep_pages_reuse_the_rerank_and_agree_with_one_big_request(indexed, model):
    settings, _ = indexed
    calls = []

    class Spy:
        def __getattr__(self, name):
            return getattr(model, name)

        def itm(self, text, vit, **kw):
            calls.append(len(vit))
            return model.itm(text, vit, **kw)

        def embed_texts(self, texts):
            calls.append(("encode", len(texts)))
            return model.embed_texts(texts)

    app = create_app(settings.model_copy(update={"k_candidates": 6, "rerank_top": 4}), loader=lambda s: (Spy(), Library.open(s)))
    with TestClient(app) as c:
        wait_ready(c)
        first = c.get("/api/search", params={"q": "stormy sky", "k": 5})
        assert first.json()["timings_ms"]["encode"] > 0
        assert calls == [("encode", 1), 4]
        deep = c.get("/api/search", params={"q": "stormy sky", "k": 5, "offset": 15}).json()  # past depth 6
        assert calls == [("encode", 1), 4]  # neither the text nor the top 4 were computed again
        assert deep["timings_ms"]["encode"] == 0.0
        whole = c.get("/api/search", params={"q": "stormy sky", "k": 20}).json()
    assert ids_of(deep) == ids_of(whole)[15:20]
    assert ids(first) == ids_of(whole)[:5]


def test_a_hit_has_one_json_form_for_the_api_and_the_cli():
    from searchengine.app.api import HitOut
    from searchengine.search import Hit

    hit = Hit(7, ["/p/a.jpg", "/p/b.jpg"], 0.31, 0.9, 1.21, 64, 48, "2023-01-02T03:04:05", "X100", "a dog", 0.5)
    api = HitOut(**hit.as_json(), thumbnail_url="t", preview_url="p", file_url="f").model_dump()
    assert {k: api[k] for k in hit.as_json()} == hit.as_json()
    assert set(api) - set(hit.as_json()) == {"thumbnail_url", "preview_url", "file_url"}
