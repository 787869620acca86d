"""Near-duplicate groups: real photos and their edited copies (resized, re-encoded at quality
60, 5% cropped, brightened) are grouped with their original, different photos are not; by the
library, the CLI and the API. Plus the candidate search's approximate branch on synthetic vectors."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageEnhance

from searchengine.indexing.pipeline import Indexer
from searchengine.app.api import create_app
from searchengine.search.duplicates import find_duplicates
from searchengine.errors import QueryError
from searchengine.library import Library
from searchengine.models.retrieval import RetrievalModel
from searchengine.config.settings import Settings
from tests.inprocess import run_cli
from tests.trained import photo_model

DISTINCT = ["Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "LadyBird", "Storm", "Wood"]
EDITED = ["Aqua", "Garden", "Wood"]
# mate-backgrounds ships one photo at three sizes: near-duplicates of the real world.
ELEPHANTS = ["Elephants", "Elephants_3840x2160", "Elephants_5640x3172"]
THRESHOLD = 0.9


def edits(image: Image.Image) -> dict[str, Image.Image]:
    w, h = image.size
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=60)
    dx, dy = int(w * 0.05), int(h * 0.05)
    return {
        "resized": image.resize((w // 3, h // 3), Image.Resampling.LANCZOS),
        "q60": Image.open(io.BytesIO(buf.getvalue())).convert("RGB"),
        "crop5": image.crop((dx, dy, w - dx, h - dy)),
        "bright": ImageEnhance.Brightness(image).enhance(1.2),
    }


@pytest.fixture(scope="module")
def library_of_copies(tmp_path_factory, photos_dir):
    by_stem = {p.stem: p for p in photos_dir.rglob("*") if p.suffix.lower() in (".jpg", ".png")}
    missing = [n for n in DISTINCT + ELEPHANTS if n not in by_stem]
    assert not missing, f"mate-backgrounds lacks {missing}"
    model_dir = photo_model([by_stem[n] for n in DISTINCT + ELEPHANTS[:1]])
    root = tmp_path_factory.mktemp("dups")
    folder = root / "photos"
    folder.mkdir()
    truth: list[set[str]] = []
    for name in DISTINCT:
        image = Image.open(by_stem[name]).convert("RGB")
        image.thumbnail((1200, 1200))
        image.save(folder / f"{name}.jpg", quality=92)
        if name in EDITED:
            group = {str(folder / f"{name}.jpg")}
            for what, copy in edits(image).items():
                copy.save(folder / f"{name}-{what}.jpg", quality=92)
                group.add(str(folder / f"{name}-{what}.jpg"))
            truth.append(group)
    elephants = set()
    for name in ELEPHANTS:
        image = Image.open(by_stem[name]).convert("RGB")
        image.thumbnail((1600, 1600))
        image.save(folder / f"{name}.jpg", quality=90)
        elephants.add(str(folder / f"{name}.jpg"))
    truth.append(elephants)
    settings = Settings(data_dir=root / "data", model=str(model_dir), device="cpu", dtype="float32", batch_size=8, refresh_interval_s=0)
    model = RetrievalModel.load(str(model_dir), device="cpu", dtype="float32")
    library = Library.open(settings, create=True)
    Indexer(model, library, settings).run([folder])
    yield library, truth, settings, model
    library.close()


def path_groups(library, groups) -> list[set[str]]:
    return [{library.catalog.image_detail(i).files[0].path for i in g.ids} for g in groups]


def test_edited_copies_are_grouped_with_their_original_and_different_photos_are_not(library_of_copies):
    library, truth, *_ = library_of_copies
    found = find_duplicates(library, THRESHOLD)
    got = path_groups(library, found.groups)
    assert sorted(map(sorted, got)) == sorted(map(sorted, truth))
    assert found.images == 8 + 3 * 4 + 3 and [len(g.members) for g in found.groups] == [5, 5, 5, 3]
    assert all(m.score >= THRESHOLD for g in found.groups for m in g.members)
    # the candidates came from the vector index: far fewer pairs than all of them
    assert found.pairs_scored < found.images * (found.images - 1) // 2
    assert find_duplicates(library, 0.999).groups == [] or all(
        m.score >= 0.999 for g in find_duplicates(library, 0.999).groups for m in g.members
    )
    with pytest.raises(QueryError):
        find_duplicates(library, 1.5)


def test_cli_duplicates(library_of_copies):
    library, truth, settings, _ = library_of_copies
    env = {"SEARCHENGINE_DATA_DIR": str(settings.data_dir)}
    r = run_cli("duplicates", "--threshold", str(THRESHOLD), "--json", env=env)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert sorted(sorted(m["path"] for m in g) for g in data["groups"]) == sorted(map(sorted, truth))
    assert all(m["bytes"] > 0 and m["width"] > 0 for g in data["groups"] for m in g)
    r = run_cli("duplicates", "--threshold", str(THRESHOLD), env=env)
    assert r.returncode == 0 and r.stdout.count("group ") == 4 and "Aqua-crop5.jpg" in r.stdout
    assert "4 groups among 23 images" in r.stderr
    r = run_cli("duplicates", "--threshold", "2", env=env)
    assert r.returncode == 1 and "0.5 to 1" in r.stderr


def test_api_duplicates_pages_through_groups(library_of_copies):
    library, truth, settings, model = library_of_copies
    app = create_app(settings, loader=lambda s: (model, Library.open(s)))
    with TestClient(app) as client:
        from tests.app.test_api import wait_ready

        wait_ready(client)
        first = client.get("/api/duplicates", params={"threshold": THRESHOLD, "limit": 3}).json()
        assert first["total"] == 4 and first["next_offset"] == 3 and len(first["groups"]) == 3
        rest = client.get("/api/duplicates", params={"threshold": THRESHOLD, "limit": 3, "offset": 3}).json()
        assert rest["next_offset"] is None
        groups = [{m["path"] for m in g["images"]} for g in first["groups"] + rest["groups"]]
        assert sorted(map(sorted, groups)) == sorted(map(sorted, truth))
        member = first["groups"][0]["images"][0]
        assert member["thumbnail_url"] == f"/api/images/{member['id']}/thumbnail" and member["bytes"] > 0
        assert client.get(member["thumbnail_url"]).status_code == 200
        assert client.get("/api/duplicates", params={"threshold": 0.2}).status_code == 422


class VectorsOnly:
    """A library's two calls `find_duplicates` makes, over vectors held in memory."""

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = vectors
        self.catalog = self  # the stored vectors are read through the library's catalog

    def indexed_ids(self) -> np.ndarray:
        return np.arange(1, len(self.vectors) + 1)

    def iter_vectors(self, ids):
        ids = np.asarray(list(ids), dtype=np.int64)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            yield chunk, self.vectors[chunk - 1]


def test_the_approximate_candidate_search_finds_planted_near_duplicates():
    """3,000 BLIP-2-shaped images (32 x 64-d), 60 of them with a lightly perturbed copy; the
    IVF branch (exact_max below the library's size) finds every planted pair and nothing else."""
    rng = np.random.default_rng(0)
    n, planted = 3000, 60
    vectors = rng.normal(size=(n, 32, 64)).astype(np.float32)
    for i in range(planted):
        vectors[n - 1 - i] = vectors[i] + rng.normal(0, 0.15, size=(32, 64))
    vectors /= np.linalg.norm(vectors, axis=2, keepdims=True)
    found = find_duplicates(VectorsOnly(vectors), 0.95, exact_max=1000)
    pairs = sorted(tuple(g.ids) for g in found.groups)
    assert pairs == sorted((i + 1, n - i) for i in range(planted))
    assert found.pairs_scored < 2 * n
