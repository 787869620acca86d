"""`searchengine reindex --model` (issue 15): every image re-embedded by the new model while
the old index keeps serving; one atomic switch; captions kept; a crash at any moment leaves
the old index in use or the new one complete; a running server switches models."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from searchengine.indexing.report import Report
from searchengine.indexing.pipeline import Indexer
from searchengine.indexing.reindex import Reindexer
from searchengine.library import Library
from searchengine.models.retrieval import RetrievalModel
from searchengine.search import Searcher
from searchengine.models.tiny import build_tiny_model
from searchengine.config.settings import Settings
from tests.server import EXE, env_for


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("other-blip2"), seed=7)


@pytest.fixture(scope="module")
def other_model(other_model_dir) -> RetrievalModel:
    return RetrievalModel.load(str(other_model_dir), device="cpu", dtype="float32")


def pictures(folder: Path, n: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(buf, "PNG")
        (folder / f"p{i:03d}.png").write_bytes(buf.getvalue())
    return folder


def settings_for(data: Path, **kw) -> Settings:
    return Settings(data_dir=data, device="cpu", dtype="float32", batch_size=4, captions=False, **kw)


def index(settings: Settings, model: RetrievalModel, folder: Path) -> None:
    lib = Library.open(settings, create=True, writable=True)
    Indexer(model, lib, settings).run([folder])
    lib.close()


def vectors_by_path(settings: Settings) -> dict[str, np.ndarray]:
    lib = Library.open(settings, writable=False, vectors=False)
    try:
        ids = lib.store.image_ids()
        recs = lib.catalog.images(ids.tolist())
        return {recs[int(i)].paths[0]: v for got, vecs in lib.catalog.iter_vectors(ids) for i, v in zip(got, vecs)}
    finally:
        lib.close()


def test_reindex_equals_indexing_with_the_new_model_and_keeps_captions(tmp_path, model, other_model):
    folder = pictures(tmp_path / "photos", 10)
    data = tmp_path / "data"
    s = settings_for(data)
    index(s, model, folder)
    lib = Library.open(s, writable=True)
    ids = lib.indexed_ids().tolist()
    lib.set_captions([(i, f"caption {i}", "someone", None) for i in ids])
    lib.close()
    (folder / "p003.png").unlink()  # gone since it was indexed: leaves the index at the swap

    lib = Library.open(s, writable=True, vectors=False)
    skipped = []
    summary = Reindexer(other_model, lib, s, report=Report(skipped=lambda what, why: skipped.append(what))).run()
    assert (summary.embedded, summary.gone, summary.resumed_from) == (9, 1, 0)
    assert skipped == [str(folder / "p003.png")]
    assert lib.built_with().model.fingerprint == other_model.fingerprint
    assert lib.counts() == (9, 9 * other_model.num_query_tokens)
    lib.close()

    fresh = settings_for(tmp_path / "fresh")
    index(fresh, other_model, folder)
    got, want = vectors_by_path(s), vectors_by_path(fresh)
    assert got.keys() == want.keys() and len(got) == 9
    for path in got:  # equal but for float noise (batches of other images alongside)
        np.testing.assert_allclose(got[path], want[path], atol=1e-4)
    # The same answers as an index made with the new model; captions kept.
    lib = Library.open(s)
    searcher = Searcher(other_model, lib, s)
    fresh_lib = Library.open(fresh)
    for query in ("a dog", "red", "caption"):
        a = searcher.search(query, k=5, mode="semantic")
        b = Searcher(other_model, fresh_lib, fresh).search(query, k=5, mode="semantic")
        assert [h.path for h in a.hits] == [h.path for h in b.hits]
        assert [h.score for h in a.hits] == pytest.approx([h.score for h in b.hits], abs=1e-6)
    assert all(h.caption.startswith("caption ") for h in searcher.search("a dog", k=9, mode="semantic").hits)
    # The feature cache (CPU: ITM reads ViT outputs from it) is the new model's.
    by_path = {h.path: h.image_id for h in searcher.search("a dog", k=9, mode="semantic").hits}
    fresh_by_path = {h.path: h.image_id for h in Searcher(other_model, fresh_lib, fresh).search("a dog", k=9, mode="semantic").hits}
    for path, image_id in by_path.items():
        np.testing.assert_allclose(lib.cached_vit(image_id), fresh_lib.cached_vit(fresh_by_path[path]), atol=2e-3)
    assert not (data / "features.next").exists()
    lib.close()
    fresh_lib.close()


@pytest.mark.dtype
def test_a_reindex_in_bf16_of_a_float32_index(tmp_path, model, other_model_dir):
    """As a library indexed on a CPU is re-embedded on a GPU (bf16): the vectors are the bf16
    model's, recorded as such, and a float32 search reads them as the same model."""
    bf16 = RetrievalModel.load(str(other_model_dir), device="cpu", dtype="bfloat16")
    folder = pictures(tmp_path / "photos", 6)
    s = settings_for(tmp_path / "data")
    index(s, model, folder)
    lib = Library.open(s, writable=True, vectors=False)
    assert Reindexer(bf16, lib, s).run().embedded == 6
    assert lib.store.made_by() == ["bfloat16 on cpu"] and lib.built_with().model.dtype == "bfloat16"
    lib.close()
    fresh = settings_for(tmp_path / "fresh")
    index(fresh, bf16, folder)
    got, want = vectors_by_path(s), vectors_by_path(fresh)
    for path in got:  # bf16's rounding differs with what else is in a batch
        np.testing.assert_allclose(got[path], want[path], atol=0.02)
    fp32 = RetrievalModel.load(str(other_model_dir), device="cpu", dtype="float32")
    lib = Library.open(s)
    hits = Searcher(fp32, lib, s).search("a dog", k=6, mode="semantic").hits
    assert len(hits) == 6 and all(h.itm is not None for h in hits)
    lib.close()


def test_a_server_switches_to_the_new_model_once_it_is_loaded(tmp_path, model, other_model_dir, other_model):
    from searchengine.service import QueryService

    folder = pictures(tmp_path / "photos", 8)
    s = settings_for(tmp_path / "data")
    index(s, model, folder)
    serving = Library.open(s)
    from searchengine.app import wiring

    service = QueryService(s, model, serving, load_model=lambda name: wiring.load_model(s, name, serving=True))
    before = [h.path for h in service.searcher.search("a dog", k=8, mode="semantic").hits]

    writer = Library.open(s, writable=True, vectors=False)  # another process's re-index
    Reindexer(other_model, writer, s).run()
    writer.close()
    assert serving.model_changed()
    service.refresh(force=True)  # starts loading the new model; the old one answers meanwhile
    assert [h.path for h in service.searcher.search("a dog", k=8, mode="semantic").hits] == before
    service._next_model.join(timeout=120)
    service.refresh(force=True)
    assert service.model.fingerprint == other_model.fingerprint
    assert not serving.model_changed()
    fresh = settings_for(tmp_path / "fresh")
    index(fresh, other_model, folder)
    want = Searcher(other_model, Library.open(fresh), fresh).search("a dog", k=8, mode="semantic")
    got = service.searcher.search("a dog", k=8, mode="semantic")
    assert [h.path for h in got.hits] == [h.path for h in want.hits]
    assert [h.score for h in got.hits] == pytest.approx([h.score for h in want.hits], abs=1e-3)
    serving.close()


def test_an_interrupted_reindex_leaves_the_old_index_in_use_and_resumes(tmp_path, model, other_model):
    folder = pictures(tmp_path / "photos", 12)
    s = settings_for(tmp_path / "data")
    index(s, model, folder)

    class Stop(Exception):
        pass

    lib = Library.open(s, writable=True, vectors=False)
    seen = []

    def stop_after_two_batches(n):
        seen.append(n)
        if sum(seen) >= 8:
            raise Stop

    with pytest.raises(Stop):
        Reindexer(other_model, lib, s, report=Report(done=stop_after_two_batches)).run()
    lib.close()
    # The old model and its index serve on, in full.
    lib = Library.open(s)
    assert lib.built_with().model.fingerprint == model.fingerprint
    assert len(Searcher(model, lib, s).search("anything", k=20, mode="semantic").hits) == 12
    lib.close()
    lib = Library.open(s, writable=True, vectors=False)
    summary = Reindexer(other_model, lib, s).run()
    assert (summary.resumed_from, summary.embedded) == (8, 4)
    lib.close()
    fresh = settings_for(tmp_path / "fresh")
    index(fresh, other_model, folder)
    got, want = vectors_by_path(s), vectors_by_path(fresh)
    assert got.keys() == want.keys()
    assert all(np.allclose(got[p], want[p], atol=1e-4) for p in got)


def test_a_crash_right_after_the_swap_is_repaired_on_open(tmp_path, model, other_model):
    """The swap's store transaction is the moment the new model takes over; the old model's
    vector index and feature cache, still on disk then, are never used after it."""
    folder = pictures(tmp_path / "photos", 6)
    s = settings_for(tmp_path / "data", itm_features="cache")
    index(s, model, folder)
    lib = Library.open(s, writable=True, vectors=False)
    r = Reindexer(other_model, lib, s)
    lib.swap_in_reindex = lambda: lib.store.swap_in_reindex()  # the process dies right after the transaction
    r.run()
    lib.close()
    assert s.vectors_path.exists() and any(s.features_dir.glob("*/*.npy"))  # the old model's, left behind

    reader = Library.open(s, writable=False)  # a reader first: it builds the new index in memory
    fresh = settings_for(tmp_path / "fresh")
    index(fresh, other_model, folder)
    want = Searcher(other_model, Library.open(fresh), fresh).search("x", k=6, mode="semantic", rerank=0)
    got = Searcher(other_model, reader, s).search("x", k=6, mode="semantic", rerank=0)
    assert [h.path for h in got.hits] == [h.path for h in want.hits]
    assert reader.cached_vit(got.hits[0].image_id) is None  # the old model's ViT outputs are not used
    reader.close()
    writer = Library.open(s, writable=True)
    assert not writer.store.derived_stale()
    writer.close()
    again = Library.open(s, writable=False)
    assert not again.store.derived_stale() and len(again.indexed_ids()) == 6
    assert again.cached_vit(got.hits[0].image_id) is None  # the old model's cache went; the new one fills as needed
    again.close()


def test_reindex_refuses_the_model_the_index_already_uses(tmp_path, model):
    folder = pictures(tmp_path / "photos", 2)
    s = settings_for(tmp_path / "data")
    index(s, model, folder)
    lib = Library.open(s, writable=True, vectors=False)
    with pytest.raises(Exception, match="already uses this model"):
        Reindexer(model, lib, s).run()
    lib.close()


def _next_rows(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("select count(*) from next_vectors").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_sigkill_mid_reindex_then_the_same_command_finishes(tmp_path, tiny_model_dir, other_model_dir):
    from tests.inprocess import run_cli

    folder = pictures(tmp_path / "photos", 40)
    data = tmp_path / "data"
    env = {**env_for(tiny_model_dir, data), "SEARCHENGINE_BATCH_SIZE": "2"}
    assert run_cli("index", folder, env=env, clean=False).returncode == 0
    s = Settings(data_dir=data)
    proc = subprocess.Popen([EXE, "reindex", "--model", str(other_model_dir)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and _next_rows(s.store_path) < 10:
        time.sleep(0.002)
    assert proc.poll() is None, "the re-index finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    search = run_cli("search", "anything", "--json", "-k", "40", env=env, clean=False)
    assert search.returncode == 0, search.stderr  # the old model still serves, with every image
    assert len(json.loads(search.stdout)["results"]) == 40
    done = run_cli("reindex", "--model", other_model_dir, env=env, clean=False)
    assert done.returncode == 0, done.stderr
    assert "images re-embedded (after" in done.stdout
    assert "is another checkpoint" in run_cli("search", "x", env=env, clean=False).stderr  # SEARCHENGINE_MODEL: the old one
    own = {"SEARCHENGINE_DATA_DIR": str(data)}  # the index's own model: the new one
    after = run_cli("search", "anything", "--json", "-k", "40", env=own)
    assert after.returncode == 0, after.stderr
    assert len(json.loads(after.stdout)["results"]) == 40
    assert str(other_model_dir) in run_cli("stats", "--json", env=own).stdout


def test_reindex_needs_a_model_and_an_index(tmp_path, other_model_dir):
    from tests.inprocess import run_cli

    env = {"SEARCHENGINE_DATA_DIR": str(tmp_path / "data")}
    proc = run_cli("reindex", env=env)
    assert proc.returncode == 1 and "name the model to re-index with" in proc.stderr
    proc = run_cli("reindex", "--model", other_model_dir, env=env)
    assert proc.returncode == 1 and "no index in" in proc.stderr
    assert not (tmp_path / "data").exists()
