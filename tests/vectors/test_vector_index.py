from __future__ import annotations

import numpy as np
from hypothesis import given, settings as hsettings, strategies as st

from searchengine.vectors.exact import VectorIndex


def _unit(rng, *shape):
    v = rng.standard_normal(shape).astype(np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _brute_force(ids, vecs, query, k):
    scores = (vecs @ query).max(axis=1)
    order = np.argsort(-scores, kind="stable")[:k]
    return ids[order], scores[order]


@hsettings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 60),
    q=st.integers(1, 8),
    d=st.integers(2, 16),
    k=st.integers(1, 70),
    seed=st.integers(0, 2**32 - 1),
    remove_frac=st.floats(0, 0.5),
)
def test_search_equals_brute_force_max_sim(n, q, d, k, seed, remove_frac):
    rng = np.random.default_rng(seed)
    ids = rng.choice(10_000, size=n, replace=False).astype(np.int64)
    vecs = _unit(rng, n, q, d)
    index = VectorIndex(d, q)
    index.add(ids, vecs)
    gone = ids[: int(n * remove_frac)]
    assert index.remove(gone) == len(gone)
    keep = ~np.isin(ids, gone)
    ids, vecs = ids[keep], vecs[keep]
    query = _unit(rng, d)
    got = index.search(query[None], k)[0]
    want_ids, want_scores = _brute_force(ids, vecs, query, k)
    assert len(got.ids) == min(k, len(ids))
    np.testing.assert_allclose(got.scores, want_scores, atol=1e-5)
    # Ids agree wherever the score is not tied with a neighbour.
    for i, (a, b) in enumerate(zip(got.ids, want_ids)):
        tied = np.isclose(want_scores, want_scores[i], atol=1e-6).sum() > 1
        assert tied or a == b
    assert len(set(got.ids.tolist())) == len(got.ids)
    assert sorted(index.ids().tolist()) == sorted(ids.tolist())


def test_several_queries_at_once():
    rng = np.random.default_rng(0)
    index = VectorIndex(8, 4)
    ids = np.arange(20) * 3
    vecs = _unit(rng, 20, 4, 8)
    index.add(ids, vecs)
    queries = _unit(rng, 3, 8)
    for query, got in zip(queries, index.search(queries, 5)):
        np.testing.assert_array_equal(got.ids, _brute_force(ids, vecs, query, 5)[0])


def test_empty_index_returns_nothing():
    got = VectorIndex(4, 2).search(np.ones((1, 4), np.float32), 10)[0]
    assert len(got.ids) == 0 and len(got.scores) == 0


def test_save_load_round_trip_is_atomic(tmp_path):
    rng = np.random.default_rng(1)
    index = VectorIndex(8, 4)
    index.add(np.array([5, 7]), _unit(rng, 2, 4, 8))
    path = tmp_path / "vectors.faiss"
    index.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["vectors.faiss"]  # no temp file left behind
    loaded = VectorIndex.load(path, 8, 4)
    assert sorted(loaded.ids().tolist()) == [5, 7] and len(loaded) == 2
    q = _unit(rng, 1, 8)
    np.testing.assert_array_equal(loaded.search(q, 2)[0].scores, index.search(q, 2)[0].scores)


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    import faiss
    import pytest

    path = tmp_path / "vectors.faiss"
    index = VectorIndex(4, 1)
    index.add(np.array([1]), np.ones((1, 1, 4), np.float32) / 2)
    index.save(path)
    before = path.read_bytes()

    def boom(idx, name):
        open(name, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", boom)
    index.add(np.array([2]), np.ones((1, 1, 4), np.float32) / 2)
    with pytest.raises(OSError):
        index.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["vectors.faiss"]
