"""The whole product on a PostgreSQL store (`--database`): index, keyword, semantic and hybrid
search, stats, and a second machine's data dir sharing the same database with its own FAISS
index, against a real server that the tests start (tests/pg.py)."""

from __future__ import annotations

import json
import re

import pytest

from tests.inprocess import run_cli

pytestmark = pytest.mark.slow


def _results(r) -> list[tuple[str, float | None]]:
    assert r.returncode == 0, r.stderr
    return [(x["paths"][0] if "paths" in x else x["path"], x.get("itc")) for x in json.loads(r.stdout)["results"]]


def test_index_and_search_on_postgresql_as_on_sqlite(postgres, tiny_model_dir, tiny_captioner_dir, photo_files, tmp_path):
    folder = tmp_path / "photos" / "Holidays"
    folder.mkdir(parents=True)
    for i, f in enumerate(photo_files[:6]):
        (folder / f"beach{i}{f.suffix}").write_bytes(f.read_bytes())
    (folder / "empty.jpg").write_bytes(b"")
    url = postgres.new_database()
    pg = {"SEARCHENGINE_DATA_DIR": str(tmp_path / "pg-data"), "SEARCHENGINE_DATABASE_URL": url}
    lite = {"SEARCHENGINE_DATA_DIR": str(tmp_path / "sqlite-data")}
    for env in (pg, lite):
        r = run_cli("index", folder, "--model", tiny_model_dir, "--caption-model", tiny_captioner_dir, env=env)
        assert r.returncode == 0 and "6 indexed" in r.stdout and "1 skipped" in r.stdout, r.stderr
    assert not (tmp_path / "pg-data" / "store.db").exists()  # the store is the server's
    for query, mode in (("beach3", "keyword"), ("holidays", "keyword"), ("a photo", "semantic"), ("beach a photo", "hybrid")):
        args = ("search", *query.split(), "--mode", mode, "--json", "-k", "10")
        got, want = _results(run_cli(*args, env=pg)), _results(run_cli(*args, env=lite))
        assert [p for p, _ in got] == [p for p, _ in want] and got, (query, mode)
        for (_, a), (_, b) in zip(got, want):
            assert (a is None) == (b is None) and (a is None or abs(a - b) < 1e-5)
    stats = run_cli("stats", env=pg)
    assert stats.returncode == 0 and re.search(r"images +6 \(6 files\)", stats.stdout), stats.stdout
    assert re.search(r"failed +1", stats.stdout)
    # A second machine: its own data dir (FAISS, thumbnails), the same database. Its vector
    # index is built from the store's vectors: the same ITC ranking.
    other = {**pg, "SEARCHENGINE_DATA_DIR": str(tmp_path / "other-machine")}
    args = ("search", "a", "photo", "--mode", "semantic", "--json", "-k", "10", "--no-rerank")
    assert _results(run_cli(*args, env=other)) == _results(run_cli(*args, env=pg))
    assert (tmp_path / "other-machine" / "vectors.faiss").exists()
    # Changes made through one machine reach the other: a file removed and re-indexed.
    (folder / "beach0.jpg").unlink(missing_ok=True)
    for f in folder.glob("beach0*"):
        f.unlink()
    assert run_cli("index", env=pg).returncode == 0
    got = [p for p, _ in _results(run_cli(*args, env=other))]
    assert len(got) == 5 and not any("beach0" in p for p in got)
    restore = run_cli("restore", env=pg)
    assert restore.returncode != 0 and "pg_restore" in restore.stderr
