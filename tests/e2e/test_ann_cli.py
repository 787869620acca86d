"""The approximate tier end to end: the real CLI indexes real photos with the tier forced on,
probing everything, and every kind of search answers exactly as the exact tier does."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.inprocess import run_cli

EVERYTHING = {
    "SEARCHENGINE_VECTOR_TIER": "ann", "SEARCHENGINE_ANN_FACTORY": "IVF{nlist},Flat",
    "SEARCHENGINE_ANN_REPS": "32", "SEARCHENGINE_ANN_NPROBE": "4096", "SEARCHENGINE_EXACT_SCAN_MAX": "0",
}


@pytest.fixture(scope="module")
def two_indexes(tmp_path_factory, photos_dir, tiny_model_dir):
    root = tmp_path_factory.mktemp("ann-cli")
    photos = root / "Pictures"
    shutil.copytree(photos_dir, photos)
    base = {"SEARCHENGINE_MODEL": str(tiny_model_dir), "SEARCHENGINE_CAPTIONS": "false"}
    exact = {**base, "SEARCHENGINE_DATA_DIR": str(root / "exact"), "SEARCHENGINE_VECTOR_TIER": "exact"}
    approx = {**base, "SEARCHENGINE_DATA_DIR": str(root / "ann"), **EVERYTHING}
    for env in (exact, approx):
        proc = run_cli("index", photos, "--device", "cpu", env=env)
        assert proc.returncode == 0, proc.stderr
    return photos, exact, approx


def _json(env, *args):
    proc = run_cli(*args, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_stats_show_the_tier(two_indexes):
    _, exact, approx = two_indexes
    stats = _json(approx, "stats")
    a = stats["vector_index"]
    assert a["tier"] == "ann" and a["factory"].endswith(",Flat") and a["recall_at_10"] == 1.0
    assert a["reps"] * stats["images"] == stats["vectors"]  # every vector of each image (at most 32)
    assert a["bytes_per_image"] > 0
    assert _json(exact, "stats")["vector_index"]["tier"] == "exact"
    text = run_cli("stats", env=approx).stdout
    assert "tier         approximate: IVF" in text and "recall@10 1.000" in text


@pytest.mark.parametrize(
    "args",
    [
        ("search", "a mountain lake", "--mode", "semantic", "-k", "8"),
        ("search", "a mountain lake", "--mode", "hybrid", "-k", "8"),
        ("search", "sky -water", "--mode", "semantic", "-k", "6"),
        ("search", "flowers", "--mode", "keyword", "-k", "4"),
    ],
)
def test_text_searches_answer_as_the_exact_tier(two_indexes, args):
    _, exact, approx = two_indexes
    want, got = _json(exact, *args), _json(approx, *args)
    assert [h["path"] for h in got["results"]] == [h["path"] for h in want["results"]]
    assert [round(h["score"], 5) for h in got["results"]] == [round(h["score"], 5) for h in want["results"]]


def test_image_and_filtered_searches_answer_as_the_exact_tier(two_indexes):
    photos, exact, approx = two_indexes
    example = sorted(photos.rglob("*.jpg"))[0]
    folder = sorted(p for p in photos.rglob("*") if p.is_dir())
    for args in (("search", "--image", example, "-k", "6"),) + tuple(("search", "trees", "--folder", f, "-k", "5") for f in folder[:1]):
        want, got = _json(exact, *args), _json(approx, *args)
        assert [h["path"] for h in got["results"]] == [h["path"] for h in want["results"]]
