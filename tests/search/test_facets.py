"""Filters people use: camera and lens (EXIF), file type, orientation, with counts per value
(facets); in the store, the searches, the CLI and the API; and the schema 4 upgrade that
brought the lens column."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import text, update

from searchengine.indexing.pipeline import Indexer
from searchengine.app.api import create_app
from searchengine.errors import QueryError
from searchengine.media.imageio import ImageMeta
from searchengine.library import Library
from searchengine.search import Filters, Searcher
from searchengine.config.settings import Settings
from searchengine.store.schema import SCHEMA_VERSION, meta
from searchengine.store.records import ModelInfo
from searchengine.store.writes import Store
from searchengine.store.connection import sqlite_url
from tests.inprocess import run_cli
from searchengine.store.records import NewImage

R5 = ("Canon", "Canon EOS R5", "RF24-105mm F4 L IS USM")
X100 = ("FUJIFILM", "X100V", None)
PIXEL = ("Google", "Pixel 7", "Pixel 7 back camera 6.81mm f/1.85")
# name, (make, model, lens) or None, size
FILES = [
    ("a.jpg", R5, (96, 64)), ("b.JPEG", R5, (64, 96)), ("c.jpg", X100, (80, 80)), ("d.jpg", PIXEL, (64, 96)),
    ("e.png", None, (96, 64)), ("f.webp", None, (64, 96)), ("g.jpg", R5, (96, 64)),
]


def save(path, seed, size, camera) -> None:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    if camera is None:
        image.save(path)
        return
    make, model, lens = camera
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = make, model
    if lens:
        exif.get_ifd(0x8769)[0xA434] = lens
    image.save(path, exif=exif.tobytes(), quality=90)


@pytest.fixture(scope="module")
def shot(tmp_path_factory, tiny_model_dir, model):
    root = tmp_path_factory.mktemp("facets")
    folder = root / "shots"
    folder.mkdir()
    for seed, (name, camera, size) in enumerate(FILES):
        save(folder / name, seed, size, camera)
    settings = Settings(data_dir=root / "data", model=str(tiny_model_dir), device="cpu", dtype="float32", batch_size=8, refresh_interval_s=0)
    library = Library.open(settings, create=True)
    Indexer(model, library, settings).run([folder])
    names = {library.catalog.image_detail(i).files[0].path.rsplit("/", 1)[1]: i for i in library.indexed_ids().tolist()}
    yield library, settings, names, model
    library.close()


def test_facet_counts_and_each_facet_s_counts_ignore_its_own_choice(shot):
    library, _, _, _ = shot
    f = library.catalog.facets(Filters())
    assert f["camera"] == [("Canon EOS R5", 3), ("FUJIFILM X100V", 1), ("Google Pixel 7", 1)]  # ties by name
    assert f["lens"] == [("RF24-105mm F4 L IS USM", 3), ("Pixel 7 back camera 6.81mm f/1.85", 1)]
    assert f["type"] == [("jpeg", 5), ("png", 1), ("webp", 1)]
    assert f["orientation"] == [("landscape", 3), ("portrait", 3), ("square", 1)]
    canon = library.catalog.facets(Filters(camera="Canon EOS R5"))
    assert canon["orientation"] == [("landscape", 2), ("portrait", 1)]  # within the camera
    assert canon["type"] == [("jpeg", 3)]
    assert dict(canon["camera"])["Google Pixel 7"] == 1  # the camera facet still offers the others
    portrait_jpeg = library.catalog.facets(Filters(orientation="portrait", file_type="jpeg"))
    assert dict(portrait_jpeg["camera"]) == {"Canon EOS R5": 1, "Google Pixel 7": 1}


def test_searches_keep_to_the_facet_filters(shot):
    library, settings, names, model = shot
    searcher = Searcher(model, library, settings)

    def found(**kw) -> set[str]:
        page = searcher.search("a photo", k=20, mode="semantic", rerank=0, filters=Filters.build(**kw))
        return {h.path.rsplit("/", 1)[1] for h in page.hits}

    assert found(camera="Canon EOS R5") == {"a.jpg", "b.JPEG", "g.jpg"}
    assert found(lens="Pixel 7 back camera 6.81mm f/1.85") == {"d.jpg"}
    assert found(file_type="JPEG") == {"a.jpg", "b.JPEG", "c.jpg", "d.jpg", "g.jpg"}  # any case, .jpeg too
    assert found(file_type="webp") == {"f.webp"}
    assert found(orientation="square") == {"c.jpg"}
    assert found(orientation="portrait", camera="Canon EOS R5") == {"b.JPEG"}
    kw = searcher.search("shots", k=20, mode="keyword", filters=Filters.build(orientation="landscape"))
    assert {h.path.rsplit("/", 1)[1] for h in kw.hits} == {"a.jpg", "e.png", "g.jpg"}
    for bad in ({"file_type": "doc"}, {"orientation": "round"}):
        with pytest.raises(QueryError):
            Filters.build(**bad)


@pytest.mark.dtype
def test_cli_facet_filters(shot):
    _, settings, _, _ = shot
    env = {"SEARCHENGINE_DATA_DIR": str(settings.data_dir)}
    r = run_cli("search", "a", "photo", "--mode", "semantic", "--camera", "Canon EOS R5", "--orientation", "landscape", "-f", env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(line.rsplit("/", 1)[1] for line in r.stdout.split()) == ["a.jpg", "g.jpg"]
    r = run_cli("search", "photo", "--type", "png", "--json", env=env)
    assert [x["path"].rsplit("/", 1)[1] for x in json.loads(r.stdout)["results"]] == ["e.png"]
    r = run_cli("search", "photo", "--type", "doc", env=env)
    assert r.returncode == 2  # argparse names the choices


def test_api_facets_and_filters(shot):
    library, settings, names, model = shot
    app = create_app(settings, loader=lambda s: (model, Library.open(s)))
    with TestClient(app) as client:
        from tests.app.test_api import wait_ready

        wait_ready(client)
        f = client.get("/api/facets").json()
        assert {v["value"]: v["images"] for v in f["type"]} == {"jpeg": 5, "png": 1, "webp": 1}
        assert f["lens"][0] == {"value": "RF24-105mm F4 L IS USM", "images": 3}
        f = client.get("/api/facets", params={"camera": "Canon EOS R5"}).json()
        assert {v["value"]: v["images"] for v in f["orientation"]} == {"landscape": 2, "portrait": 1}
        r = client.get("/api/search", params={"q": "photo", "mode": "semantic", "type": "jpeg", "orientation": "portrait"})
        assert {h["path"].rsplit("/", 1)[1] for h in r.json()["hits"]} == {"b.JPEG", "d.jpg"}
        assert client.get("/api/search", params={"q": "photo", "type": "doc"}).status_code == 422
        assert client.get("/api/facets", params={"orientation": "round"}).status_code == 422
        assert client.get("/api/facets", params={"folder": "nowhere-at-all"}).status_code == 404


def test_schema_3_stores_get_the_lens_column_and_read_only_ones_work_without_it(tmp_path):
    url = sqlite_url(tmp_path / "v3.db")
    s = Store.open(url)
    s.bind_model(ModelInfo("m", "f", 2, 4, (5, 4)))
    s.add_root("/p")
    vec = np.ones((2, 4), np.float32) / 2
    s.write_batch(new_images=[NewImage("h1", ImageMeta(30, 20, camera="X", lens="L"), vec, None, b"", ("/p/a.jpg", 1, 1))])
    with s.engine.begin() as conn:  # what schema 3 wrote: no lens column
        conn.execute(text("ALTER TABLE images DROP COLUMN lens"))
        conn.execute(update(meta).where(meta.c.key == "schema_version").values(value="3"))
    s.close()
    ro = Store.open(url, read_only=True)
    try:
        f = ro.facets(Filters())
        assert f["lens"] == [] and f["camera"] == [("X", 1)] and f["orientation"] == [("landscape", 1)]
        assert ro.filter_ids(Filters(lens="L")).tolist() == [] and ro.filter_ids(Filters(camera="X")).tolist() == [1]
    finally:
        ro.close()
    s = Store.open(url)
    try:
        with s.engine.connect() as conn:
            assert conn.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar() == str(SCHEMA_VERSION)
        s.write_batch(new_images=[NewImage("h2", ImageMeta(20, 30, lens="L"), vec, None, b"", ("/p/b.jpg", 1, 1))])
        assert s.facets(Filters())["lens"] == [("L", 1)]
    finally:
        s.close()
