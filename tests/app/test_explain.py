"""Where a query matches a photo, over HTTP and from the command line (issue 31): an indexed
folder of two-squares pictures, the model trained on them (tests/trained.py)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from searchengine.app.api import create_app
from searchengine.config.settings import Settings
from searchengine.indexing.pipeline import Indexer
from searchengine.library import Library
from searchengine.models.retrieval import RetrievalModel
from tests.app.test_api import wait_ready
from tests.models.test_explain import peak_in
from tests.trained import two_squares

SCALE = 4  # the pictures are saved at 4x the model's 64 px, so the overlay has a size of its own


@pytest.fixture(scope="module")
def squares(tmp_path_factory, object_model_dir):
    root = tmp_path_factory.mktemp("explain")
    (root / "photos").mkdir()
    rng = np.random.default_rng(7)
    boxes = {}
    for i in range(8):
        picture, where = two_squares(rng)
        picture.resize((picture.width * SCALE, picture.height * SCALE), Image.Resampling.NEAREST).save(root / "photos" / f"p{i}.png")
        boxes[f"p{i}.png"] = where
    settings = Settings(data_dir=root / "data", model=str(object_model_dir), device="cpu", dtype="float32", batch_size=8,
                        refresh_interval_s=0, text_batch_wait_ms=2, preview_size=200)
    model = RetrievalModel.load(str(object_model_dir), device="cpu", dtype="float32")
    library = Library.open(settings, create=True)
    Indexer(model, library, settings).run([root / "photos"])
    library.close()
    app = create_app(settings, loader=lambda s: (model, Library.open(s)))
    with TestClient(app) as client:
        wait_ready(client)
        hits = client.get("/api/search", params={"q": "p", "mode": "keyword", "k": 50}).json()["hits"]
        ids = {h["path"].rsplit("/", 1)[1]: h["id"] for h in hits}
        assert sorted(ids) == sorted(boxes)
        yield client, settings, root, ids, boxes


def test_the_map_of_each_square_over_http_peaks_inside_it_and_scores_as_search_does(squares):
    client, _, _, ids, boxes = squares
    hits = 0
    for name, image_id in ids.items():
        for colour, box in boxes[name].items():
            r = client.get(f"/api/images/{image_id}/explain", params={"q": f"a {colour} square"})
            assert r.status_code == 200, r.text
            body = r.json()
            grid = np.array(body["grid"])
            assert grid.shape == (8, 8) and grid.max() == 1.0 and body["image_id"] == image_id
            hits += peak_in(grid, box)
            assert body["overlay_url"] == f"/api/images/{image_id}/explain.png?q=a+{colour}+square"
            # The P(match) it explains is the one the re-ranked search scores the image with.
            found = client.get("/api/search", params={"q": f"a {colour} square", "k": 50, "mode": "semantic"}).json()["hits"]
            itm = next(h["itm"] for h in found if h["id"] == image_id)
            assert body["itm"] == pytest.approx(itm, abs=1e-5)
    assert hits >= 0.75 * 2 * len(ids), hits


def test_the_overlay_is_the_preview_with_the_map_over_it(squares):
    client, settings, _, ids, boxes = squares
    image_id = ids["p0.png"]
    colour, box = next(iter(boxes["p0.png"].items()))
    r = client.get(f"/api/images/{image_id}/explain.png", params={"q": f"a {colour} square"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    overlay = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), np.float32)
    preview = np.asarray(Image.open(io.BytesIO(client.get(f"/api/images/{image_id}/preview").content)).convert("RGB"), np.float32)
    assert overlay.shape == preview.shape == (200, 200, 3)  # the preview's size (preview_size 200)
    grid = np.array(client.get(f"/api/images/{image_id}/explain", params={"q": f"a {colour} square"}).json()["grid"])
    # Tinted most where the map peaks, and least where it is weakest.
    cell = 200 // 8
    row, column = np.unravel_index(int(np.argmax(grid)), grid.shape)
    low_row, low_column = np.unravel_index(int(np.argmin(grid)), grid.shape)
    change = np.abs(overlay - preview).sum(axis=2)
    at = lambda r, c: change[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].mean()  # noqa: E731
    assert at(row, column) > at(low_row, low_column) + 20


def test_an_upload_is_explained_and_drawn_over(squares):
    client, _, root, _, boxes = squares
    data = (root / "photos" / "p1.png").read_bytes()
    colour, box = next(iter(boxes["p1.png"].items()))
    r = client.post("/api/explain", files={"image": ("p1.png", data, "image/png")}, data={"q": f"a {colour} square"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image_id"] is None and np.array(body["grid"]).shape == (8, 8)
    drawn = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert drawn.format == "PNG" and drawn.size == (200, 200)  # the upload, at preview_size at most
    # A photo's size of upload (over the 1 MiB a JSON body may have) is taken as uploads are.
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 900, 3), dtype=np.uint8)).save(big, "PNG")
    assert big.tell() > 2 << 20
    r = client.post("/api/explain", files={"image": ("big.png", big.getvalue(), "image/png")}, data={"q": "a red square"})
    assert r.status_code == 200, r.text


def test_what_it_refuses(squares):
    client, _, _, ids, _ = squares
    image_id = next(iter(ids.values()))
    assert client.get("/api/images/999999/explain", params={"q": "a red square"}).status_code == 404
    for q in ("", "   ", "?!"):  # refused as every query parameter is, saying what to fix
        r = client.get(f"/api/images/{image_id}/explain", params={"q": q})
        assert r.status_code == 422 and r.json()["error"].startswith("q"), (q, r.text)
    assert client.get(f"/api/images/{image_id}/explain").status_code == 422  # no words at all
    r = client.post("/api/explain", files={"image": ("x.png", b"not an image", "image/png")}, data={"q": "a red square"})
    assert r.status_code == 400 and "not a usable image" in r.json()["error"], r.text


def test_the_command_line_writes_the_map_over_the_photo(squares):
    from tests.inprocess import run_cli

    _, settings, root, ids, boxes = squares
    colour, box = next(iter(boxes["p2.png"].items()))
    out = root / "map.png"
    proc = run_cli("explain", str(ids["p2.png"]), "a", colour, "square", "--out", out, "--data-dir", settings.data_dir,
                   "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout)
    grid = np.array(body["grid"])
    assert body["query"] == f"a {colour} square" and body["image"].endswith("p2.png") and grid.shape == (8, 8)
    assert body["peak"] == list(np.unravel_index(int(np.argmax(grid)), grid.shape))
    assert Image.open(out).size == (256, 256)  # the photo's own size: under the default preview_size
    proc = run_cli("explain", root / "photos" / "p2.png", "a", colour, "square", "--data-dir", settings.data_dir, "--device", "cpu")
    assert proc.returncode == 0 and proc.stdout.startswith("P(match) ") and "of 8 x 8" in proc.stdout, proc.stdout
    proc = run_cli("explain", "424242", "a red square", "--data-dir", settings.data_dir, "--device", "cpu")
    assert proc.returncode != 0 and "no indexed image has id 424242" in proc.stderr, proc.stderr
