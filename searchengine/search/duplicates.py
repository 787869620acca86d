"""Near-duplicate groups: resized, re-encoded, lightly cropped or edited copies, bursts.

Exact copies are one image already (same content, several paths). Near-duplicates are
different files whose images score at least `threshold` against each other by the
image-to-image score of "more like this" (`queries.image_similarity`, taken both ways and
averaged so that the score of a pair does not depend on its order). Pairs are linked into
groups (connected components): a burst of five frames is one group.

No pair of images is compared unless a vector index proposed it, so the cost grows with the
library, not with its square:

1. one pass over the stored vectors keeps each image's mean ITC vector, normalised
   (100k images: 100 MB of float32);
2. a FAISS index over those means proposes each image's `neighbours` nearest images (exact,
   inner product, up to `exact_max` images; above, IVF with 4 sqrt(n) lists and 16 probed);
3. each proposed pair whose means are within `prefilter` of the threshold is scored exactly
   from the stored vectors, read in chunks.

`benchmarks/duplicates.py` measures it at 10k and 100k images.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from searchengine.errors import QueryError
from searchengine.search import image_similarity

if TYPE_CHECKING:
    from searchengine.library import ImageDetail, Library

DEFAULT_THRESHOLD = 0.95


@dataclass
class Member:
    id: int
    score: float  # its best score against another image of the group


@dataclass
class Group:
    members: list[Member]  # best-connected first

    @property
    def ids(self) -> list[int]:
        return [m.id for m in self.members]


@dataclass
class Duplicates:
    threshold: float
    groups: list[Group]  # largest first
    images: int  # images compared
    pairs_scored: int  # pairs the vector index proposed and that were scored exactly
    timings_ms: dict[str, float] = field(default_factory=dict)


def check_threshold(threshold: float) -> float:
    if not (0.5 <= threshold <= 1.0):  # NaN fails too
        raise QueryError(f"the duplicate threshold is an image-to-image score from 0.5 to 1, not {threshold}")
    return float(threshold)


def find_duplicates(
    library: "Library",
    threshold: float = DEFAULT_THRESHOLD,
    *,
    neighbours: int = 8,
    prefilter: float = 0.15,
    exact_max: int = 20_000,
    chunk: int = 2000,
) -> Duplicates:
    """Near-duplicate groups of the library's indexed images (see the module's docstring)."""
    threshold = check_threshold(threshold)
    t0 = time.perf_counter()
    ids, means = _means(library, chunk)
    t1 = time.perf_counter()
    pairs = _candidate_pairs(means, neighbours, threshold - prefilter, exact_max)
    t2 = time.perf_counter()
    scores = _score_pairs(library, ids, pairs, chunk)
    t3 = time.perf_counter()
    keep = scores >= threshold
    groups = _groups(ids, pairs[keep], scores[keep])
    timings = {"read": (t1 - t0) * 1000, "candidates": (t2 - t1) * 1000, "score": (t3 - t2) * 1000}
    timings["total"] = (time.perf_counter() - t0) * 1000
    return Duplicates(threshold, groups, len(ids), len(pairs), timings)


def with_details(library: "Library", groups: list[Group]) -> list[list[tuple[Member, "ImageDetail"]]]:
    """The groups as shown (the CLI and the API alike): each member with its files, size and
    date; members deleted since left out, and a group left with one member dropped."""
    details = {i: library.catalog.image_detail(i) for g in groups for i in g.ids}
    shown = []
    for g in groups:
        members = [(m, details[m.id]) for m in g.members if details[m.id] is not None and details[m.id].files]
        if len(members) > 1:
            shown.append(members)
    return shown


def _means(library: "Library", chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n], each image's mean ITC vector, normalised [n, D] float32), in id order."""
    wanted = np.sort(library.indexed_ids())
    got_ids, got = [], []
    for ids, vectors in library.catalog.iter_vectors(wanted.tolist()):
        mean = vectors.astype(np.float32).mean(axis=1)
        mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
        got_ids.append(ids)
        got.append(mean)
    if not got:
        return np.zeros(0, np.int64), np.zeros((0, 1), np.float32)
    ids, means = np.concatenate(got_ids), np.concatenate(got)
    order = np.argsort(ids)
    return ids[order], np.ascontiguousarray(means[order])


def _candidate_pairs(means: np.ndarray, neighbours: int, floor: float, exact_max: int) -> np.ndarray:
    """Row pairs (i < j) [m, 2] that the index over the means proposes with cosine >= floor."""
    import faiss

    n = len(means)
    if n < 2:
        return np.zeros((0, 2), np.int64)
    dim = means.shape[1]
    k = min(neighbours + 1, n)
    if n <= exact_max:
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = int(4 * math.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = means[np.random.default_rng(0).choice(n, min(n, 64 * nlist), replace=False)]
        index.train(sample)
        index.nprobe = 16
    index.add(means)
    sims, found = index.search(means, k)
    rows = np.repeat(np.arange(n), k)
    cols, sims = found.reshape(-1), sims.reshape(-1)
    ok = (cols >= 0) & (cols != rows) & (sims >= floor)
    pairs = np.stack([np.minimum(rows[ok], cols[ok]), np.maximum(rows[ok], cols[ok])], axis=1)
    return np.unique(pairs, axis=0) if len(pairs) else np.zeros((0, 2), np.int64)


def _score_pairs(library: "Library", ids: np.ndarray, pairs: np.ndarray, chunk: int) -> np.ndarray:
    """The image-to-image score of each pair (rows into `ids`), both ways averaged."""
    scores = np.zeros(len(pairs), np.float32)
    start = 0
    while start < len(pairs):
        # A chunk of pairs whose images fit in memory at once (pairs come sorted by first row).
        rows = set()
        end = start
        while end < len(pairs) and len(rows) < chunk:
            rows.update(pairs[end].tolist())
            end += 1
        vectors: dict[int, np.ndarray] = {}
        for got_ids, got in library.catalog.iter_vectors(ids[sorted(rows)].tolist()):
            vectors.update(zip(got_ids.tolist(), got.astype(np.float32)))
        for p in range(start, end):
            a, b = (vectors.get(int(ids[r])) for r in pairs[p])
            if a is None or b is None:  # deleted meanwhile
                scores[p] = -1.0
                continue
            score = 0.5 * (image_similarity(a, b[None])[0] + image_similarity(b, a[None])[0])
            scores[p] = min(float(score), 1.0)  # float sums of an image with itself reach 1 + 1e-5
        start = end
    return scores


def _groups(ids: np.ndarray, pairs: np.ndarray, scores: np.ndarray) -> list[Group]:
    """Connected components of the linked pairs, each member with its best link's score."""
    parent = list(range(len(ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    best: dict[int, float] = {}
    for (a, b), s in zip(pairs.tolist(), scores.tolist()):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
        best[a] = max(best.get(a, -1.0), s)
        best[b] = max(best.get(b, -1.0), s)
    members: dict[int, list[int]] = {}
    for row in best:
        members.setdefault(root(row), []).append(row)
    groups = [
        Group([Member(int(ids[r]), float(best[r])) for r in sorted(rows, key=lambda r: (-best[r], ids[r]))])
        for rows in members.values()
    ]
    groups.sort(key=lambda g: (-len(g.members), min(g.ids)))
    return groups
