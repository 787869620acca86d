"""The multi-vector FAISS index: every image is Q vectors (32 for BLIP-2) under the image's id.

An image's ITC score for a text is the maximum over its Q vectors of the inner product. A
search fetches the top k*Q vectors, groups them by id and keeps each id's best: that is exact
for the top k images, because at most k images can score at or above the k-th best image, so
at most k*Q vectors can outscore that image's own best vector.

The index is derived data: the store keeps every vector, and `Library` reconciles the two on
open. Files are written atomically (temp file, fsync, rename, fsync of the folder).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from searchengine.util.durable import disk_full, write_atomic  # noqa: F401 - write_atomic: ann and library write through it

if TYPE_CHECKING:
    import faiss


def faiss_lib():
    """FAISS, imported on first use: commands that need no vector index (stats of an index
    without vectors, keyword search) do not pay for it."""
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - exercised only on a broken install
        raise ImportError(
            "FAISS is not installed: pip install 'searchengine[cpu]' (faiss-cpu) or 'searchengine[gpu]' (faiss-gpu)"
        ) from e
    return faiss


# How far apart an index's vector and the store's may be and still be the same one: both are
# the store's float16 values (any file from before them is rebuilt), so in fact 0.
AGREEMENT = 1e-3
SAMPLE = 64  # images compared on open; `check` compares them all


@dataclass
class Candidates:
    ids: np.ndarray  # [n] int64, best first
    scores: np.ndarray  # [n] float32, max-sim ITC score


class VectorIndex:
    def __init__(self, dim: int, num_vectors: int, index: "faiss.Index | None" = None) -> None:
        self.dim = dim
        self.num_vectors = num_vectors
        # IDMap2 over an exact inner-product index: ids repeat (Q per image), and remove_ids
        # and reconstruction work.
        if index is None:
            faiss = faiss_lib()
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.index = index

    tier = "exact"

    def __len__(self) -> int:
        return self.index.ntotal // self.num_vectors

    @property
    def ntotal(self) -> int:
        """Vectors held (Q per image)."""
        return int(self.index.ntotal)

    def holds_float16_values(self, sample: int = 64) -> bool:
        """Whether its first vectors are float16 values (as the store keeps them since schema
        3): a file saved before holds float32 ones and is rebuilt from the store."""
        n = min(self.index.ntotal, sample)
        if n == 0:
            return True
        flat = faiss_lib().downcast_index(self.index.index)
        x = flat.reconstruct_n(0, n)
        return bool(np.array_equal(x, x.astype(np.float16).astype(np.float32)))

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        """ids [n], vecs [n, Q, D] (L2-normalised)."""
        ids = checked_batch(ids, vecs, self.num_vectors, self.dim)
        if len(ids) == 0:
            return
        flat = np.ascontiguousarray(vecs.reshape(-1, self.dim), dtype=np.float32)
        self.index.add_with_ids(flat, np.repeat(ids, self.num_vectors))

    def remove(self, ids) -> int:
        ids = np.asarray(list(ids), dtype=np.int64)
        if len(ids) == 0:
            return 0
        return int(self.index.remove_ids(faiss_lib().IDSelectorBatch(ids))) // self.num_vectors

    def ids(self) -> np.ndarray:
        """The distinct image ids in the index."""
        if self.index.ntotal == 0:
            return np.zeros(0, dtype=np.int64)
        return np.unique(faiss_lib().vector_to_array(self.index.id_map))

    def stored_vectors(self, ids: np.ndarray) -> dict[int, np.ndarray]:
        """image id -> the [Q, D] vectors the index holds for it (ids it lacks are left out),
        in the order they were added: what `disagreement` holds against the store's."""
        id_map = faiss_lib().vector_to_array(self.index.id_map)
        positions = np.nonzero(np.isin(id_map, np.asarray(ids, dtype=np.int64)))[0]
        if not len(positions):
            return {}
        vecs = faiss_lib().downcast_index(self.index.index).reconstruct_batch(positions)
        owners = id_map[positions]
        order = np.argsort(owners, kind="stable")  # each image's vectors together, in the order added
        owners, vecs = owners[order], vecs[order]
        uniq, start, count = np.unique(owners, return_index=True, return_counts=True)
        return {int(i): vecs[s : s + c] for i, s, c in zip(uniq, start, count) if c == self.num_vectors}

    def disagreement(self, stored: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[int, int]:
        """Hold the index against the store's vectors (`stored`: chunks of ids [n] and
        vectors [n, Q, D], as `Store.iter_vectors` gives them): (images compared, images whose
        vectors differ). A file copied from another library has the same ids and other
        vectors: only this tells it apart."""
        compared = differ = 0
        for ids, vecs in stored:
            held = self.stored_vectors(ids)
            for image_id, v in zip(ids.tolist(), vecs):
                mine = held.get(int(image_id))
                if mine is None:
                    continue  # not in the index: reconcile adds it
                compared += 1
                if mine.shape != v.shape or float(np.max(np.abs(mine - v.astype(np.float32)))) > AGREEMENT:
                    differ += 1
        return compared, differ

    def differs_on_a_sample(self, store_ids: np.ndarray, stored: Callable[[np.ndarray], Iterable[tuple[np.ndarray, np.ndarray]]]) -> bool:
        """Whether SAMPLE images that both hold, spread over the ids, have other vectors here
        than in the store (`stored(ids)`, as `Store.iter_vectors`): what opening checks, as
        ids alone are reconciled."""
        common = np.intersect1d(store_ids, self.ids())
        if not len(common):
            return False
        sample = common[np.unique(np.linspace(0, len(common) - 1, min(SAMPLE, len(common))).astype(int))]
        return self.disagreement(stored(sample))[1] > 0

    @staticmethod
    def ram_per_image(num_vectors: int, dim: int) -> int:
        """RAM an image takes in the exact tier: its float32 vectors and their ids."""
        return num_vectors * (dim * 4 + 8)

    def vectors_for(self, k: int) -> int:
        """Vectors a search for k images selects."""
        return k * self.num_vectors

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, on=None) -> list[Candidates]:
        """Top k images by max-sim for each query vector [T, D].

        `allowed`: image ids to search among (a filter); exact, because FAISS skips the other
        ids inside the search rather than after it. `on`: a copy of the index to search
        instead (the GPU's, see searchengine/vectors/gpu.py), for an unfiltered search.
        """
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        n_vec = min(self.index.ntotal, self.vectors_for(k))
        if allowed is not None:
            n_vec = min(n_vec, self.vectors_for(len(allowed)))
        if n_vec == 0 or k <= 0:
            empty = Candidates(np.zeros(0, np.int64), np.zeros(0, np.float32))
            return [empty for _ in range(len(queries))]
        params = None
        if allowed is not None:
            faiss = faiss_lib()
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64)))
        if on is not None and params is None:
            scores, labels = on.search(queries, n_vec)
        else:
            scores, labels = self.index.search(queries, n_vec, params=params)
        return [group_max(labels[t], scores[t], k) for t in range(len(queries))]

    # -- files ----------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        # FAISS meets a full disk with a C++ error printed to stderr: look for room first.
        if disk_full(Path(path).parent, need=self.index.ntotal * (self.dim * 4 + 8) + (1 << 20)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        # write_index streams to the file; serialize_index would hold a second copy in memory.
        write_atomic(path, lambda tmp: faiss_lib().write_index(self.index, str(tmp)))

    @classmethod
    def load(cls, path: Path, dim: int, num_vectors: int) -> "VectorIndex":
        index = faiss_lib().read_index(str(path))
        if index.d != dim:
            raise ValueError(f"{path} holds {index.d}-d vectors, expected {dim}")
        return cls(dim, num_vectors, index)


def checked_batch(ids, vecs: np.ndarray, num_vectors: int, dim: int) -> np.ndarray:
    """The ids of a batch to add, as int64; ValueError where its vectors are not [n, Q, D]."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) and vecs.shape[1:] != (num_vectors, dim):
        raise ValueError(f"vectors of shape {vecs.shape[1:]}, index holds {(num_vectors, dim)}")
    return ids


def group_max(labels: np.ndarray, scores: np.ndarray, k: int) -> Candidates:
    keep = labels >= 0
    labels, scores = labels[keep], scores[keep]
    # FAISS returns scores in descending order, so the first time an id appears is its max.
    uniq, first = np.unique(labels, return_index=True)
    order = np.argsort(first, kind="stable")[:k]
    return Candidates(uniq[order].astype(np.int64), scores[first[order]].astype(np.float32))


