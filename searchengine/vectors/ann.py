"""The approximate tier of the vector index, for libraries too large to scan.

An image is Q vectors (32 for BLIP-2) and its ITC score for a text is the best of their inner
products with the text's vector. The approximate index holds `reps` representatives of each
image (k-means centres of its Q vectors, unit length) as compact codes in a FAISS IVF index,
under the image's id. A search asks it for `overfetch` times as many images as wanted: the
*candidates*. `Library` then re-scores every candidate exactly from the stored vectors, so the
scores users see are always the exact max-sim, and the result equals an exact search whenever
the true top k are among the candidates (probing every list of an index that holds all Q
vectors of each image proposes them all).

The index is derived data, like the exact tier: the store keeps every vector. Its file is
written under a new name, then `ann.json` (the manifest, written atomically) is pointed at it:
that write is the moment a rebuilt index takes over. A crash before it leaves the old index in
use and a stray file that the next writer sweeps.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from searchengine.vectors.exact import Candidates, faiss_lib, group_max, checked_batch, write_atomic

log = logging.getLogger(__name__)

MIN_NLIST = 1
# 4096 lists: k-means of that many centroids trains in ~20 s on 2 cores (10 iterations over
# 40 points per list); more would cost minutes per rebuild for little speed.
MAX_NLIST = 4096
TRAIN_POINTS_PER_LIST = 40  # FAISS warns below 39
# nprobe tried at build time, from 8: fewer reaches recall@10 on easy libraries but leaves
# the deeper pages poor (recall@100 0.26 at nprobe 2 on 20k synthetic images).
NPROBES = (8, 16, 32, 64, 128, 256, 512, 1024)
# Candidates per image asked for, tried at build time in this order (each with its nprobe
# tuned): re-scoring reads 16 KiB a candidate from the store, so one more round of probing
# costs less than twice the candidates (benchmarks/ann.py: 9.0 against 16.1 ms at 100k).
OVERFETCHES = (1, 2, 4)


@dataclass
class AnnParams:
    factory: str  # the FAISS index factory string, {nlist} filled in
    nlist: int
    reps: int  # vectors per image in the index
    nprobe: int  # lists probed per query
    overfetch: int  # candidates per image asked for
    trained_on: int  # images in the library when it was trained
    recall_at_10: float | None = None  # final ranking against exact, on a sample, at build time
    recall_deep: float | None = None  # the same, of the top 100 (later pages)
    recall_queries: int = 0
    build_s: float = 0.0
    bytes_per_image: float = 0.0  # RAM, when built (`AnnIndex.bytes_per_image` is live)


def choose_nlist(n_vectors: int) -> int:
    """Inverted lists for n vectors: about 4 sqrt(n) (FAISS's guideline), a power of two,
    with at least TRAIN_POINTS_PER_LIST training points per list."""
    if n_vectors <= 0:
        return MIN_NLIST
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n_vectors))))
    while nlist > MIN_NLIST and n_vectors < TRAIN_POINTS_PER_LIST * nlist:
        nlist //= 2
    return int(min(max(nlist, MIN_NLIST), MAX_NLIST))


def representatives(vecs: np.ndarray, r: int, iterations: int = 4) -> np.ndarray:
    """[n, r, D] unit vectors that stand for each image's Q vectors [n, Q, D]: spherical
    k-means of its own Q vectors, seeded with evenly spaced ones (deterministic). r >= Q: the
    vectors themselves."""
    vecs = np.ascontiguousarray(vecs, dtype=np.float32)
    n, q, _ = vecs.shape
    if r >= q:
        return vecs
    centres = vecs[:, np.linspace(0, q - 1, r).round().astype(int)].copy()
    for _ in range(iterations):
        assign = np.einsum("nqd,nrd->nqr", vecs, centres).argmax(axis=2)  # [n, Q]
        onehot = np.zeros((n, q, r), dtype=np.float32)
        np.put_along_axis(onehot, assign[..., None], 1.0, axis=2)
        sums = np.einsum("nqr,nqd->nrd", onehot, vecs)
        empty = onehot.sum(axis=1) == 0  # [n, r]: a centre nobody chose keeps its place
        sums[empty] = centres[empty]
        centres = sums
        centres /= np.maximum(np.linalg.norm(centres, axis=2, keepdims=True), 1e-12)
    return centres


class AnnIndex:
    def __init__(self, index: "object", params: AnnParams, dim: int, num_vectors: int, ids: np.ndarray | None = None):
        self.index = index
        self.params = params
        self.dim = dim
        self.num_vectors = num_vectors
        self._ivf = faiss_lib().extract_index_ivf(index)
        self._ivf.nprobe = params.nprobe
        self._ids = self._ids_from_lists() if ids is None else np.unique(ids)

    # -- building -------------------------------------------------------------------------

    @classmethod
    def train(cls, sample: np.ndarray, params: AnnParams, dim: int, num_vectors: int) -> "AnnIndex":
        """An empty index trained on sample images' vectors [n, Q, D]."""
        faiss = faiss_lib()
        index = faiss.index_factory(dim, params.factory, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = 10
        ivf.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST
        train = representatives(sample, params.reps).reshape(-1, dim)
        # k-means wants points at least as many as centroids (256 for 8-bit codes, nlist):
        # a small library is padded with jittered copies of its own vectors.
        need = max(256, params.nlist) * 2
        rng = np.random.default_rng(0)
        while 0 < len(train) < need:
            jitter = train + 0.05 * rng.standard_normal(train.shape).astype(np.float32)
            train = np.concatenate([train, jitter / np.linalg.norm(jitter, axis=1, keepdims=True)])
        index.train(np.ascontiguousarray(train, dtype=np.float32))
        return cls(index, params, dim, num_vectors, np.zeros(0, np.int64))

    # -- the interface the library uses for either tier ------------------------------------

    tier = "ann"

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ntotal(self) -> int:
        """Vectors held (reps per image)."""
        return int(self.index.ntotal)

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        ids = checked_batch(ids, vecs, self.num_vectors, self.dim)
        if len(ids) == 0:
            return
        reps = representatives(vecs, self.params.reps)
        r = reps.shape[1]
        self.index.add_with_ids(np.ascontiguousarray(reps.reshape(-1, self.dim)), np.repeat(ids, r))
        self._ids = np.union1d(self._ids, ids)

    def remove(self, ids) -> int:
        ids = np.asarray(list(ids), dtype=np.int64)
        if len(ids) == 0:
            return 0
        present = np.intersect1d(ids, self._ids)
        if len(present):
            self.index.remove_ids(faiss_lib().IDSelectorBatch(present))
            self._ids = np.setdiff1d(self._ids, present, assume_unique=True)
        return len(present)

    def ids(self) -> np.ndarray:
        return self._ids

    def vectors_for(self, k: int) -> int:
        """Vectors a search for k images selects."""
        return k * min(self.params.reps, self.num_vectors)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, on=None) -> list[Candidates]:
        """Candidate images for each query vector [T, D]: `k` of them at most, best first by
        their approximate score (the codes' inner product, not the exact one). `on`: a copy
        to search instead (the GPU's), for an unfiltered search."""
        faiss = faiss_lib()
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        n_vec = min(self.ntotal, self.vectors_for(k))
        if allowed is not None:
            n_vec = min(n_vec, self.vectors_for(len(allowed)))
        if n_vec == 0 or k <= 0:
            return [Candidates(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in range(len(queries))]
        if on is not None and allowed is None:
            scores, labels = on.search(queries, n_vec)
            return [group_max(labels[t], scores[t], k) for t in range(len(queries))]
        params = faiss.SearchParametersIVF(nprobe=self._ivf.nprobe)
        if allowed is not None:  # FAISS skips the other ids inside the search
            sel = faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64))
            params.sel = sel
        scores, labels = self.index.search(queries, n_vec, params=params)
        return [group_max(labels[t], scores[t], k) for t in range(len(queries))]

    def set_nprobe(self, nprobe: int) -> None:
        self.params.nprobe = self._ivf.nprobe = int(min(max(nprobe, 1), self.params.nlist))

    def bytes_per_image(self) -> float:
        """RAM per image: codes and ids of its representatives, plus its share of the
        coarse quantizer's centroids."""
        if not len(self):
            return 0.0
        per_vector = self._ivf.code_size + 8  # code + id in the inverted list
        return (self.ntotal * per_vector + self.params.nlist * self.dim * 4) / len(self)

    def describe(self) -> dict:
        return {**asdict(self.params), "bytes_per_image": round(self.bytes_per_image(), 1)}

    def _ids_from_lists(self) -> np.ndarray:
        faiss = faiss_lib()
        inv = self._ivf.invlists
        parts = []
        for lst in range(self._ivf.nlist):
            size = inv.list_size(lst)
            if size:
                parts.append(faiss.rev_swig_ptr(inv.get_ids(lst), size).copy())
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    # -- files ----------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        write_atomic(path, lambda tmp: faiss_lib().write_index(self.index, str(tmp)))

    @classmethod
    def load(cls, path: Path, params: AnnParams, dim: int, num_vectors: int) -> "AnnIndex":
        index = faiss_lib().read_index(str(path))
        if index.d != dim:
            raise ValueError(f"{path} holds {index.d}-d vectors, expected {dim}")
        return cls(index, params, dim, num_vectors)


# -- the manifest ---------------------------------------------------------------------------


def new_file_name() -> str:
    return f"ann-{secrets.token_hex(6)}.faiss"


def read_manifest(path: Path) -> tuple[str, AnnParams] | None:
    """(index file name, parameters) from `ann.json`; None where there is none."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return data["file"], AnnParams(**data["params"])


def write_manifest(path: Path, file_name: str, params: AnnParams) -> None:
    text = json.dumps({"file": file_name, "params": asdict(params)}, indent=1)
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


@dataclass(frozen=True)
class Recall:
    """The final ranking's recall against exact max-sim on the build's sample queries: of the
    top 10, and deep (of the top 100, or of the depth searched where less): later pages."""

    at_10: float
    deep: float

    def margin(self, config: "BuildConfig") -> float:
        """How far past both targets (negative: short of one)."""
        return min(self.at_10 - config.target_recall, self.deep - config.target_deep)


def tune_nprobe(index: AnnIndex, config: "BuildConfig", recall: Callable[[AnnIndex], Recall]) -> Recall:
    """The smallest nprobe (of NPROBES, up to nlist) whose `recall(index)` reaches both
    targets of `config`, set on the index; returns the recall it measured there."""
    got, before = Recall(0.0, 0.0), None
    for nprobe in NPROBES:
        index.set_nprobe(nprobe)
        got = recall(index)
        if got.margin(config) >= 0 or nprobe >= index.params.nlist:
            break
        if before is not None and got.margin(config) - before[1].margin(config) < 0.002:
            # Probing more no longer helps: the representatives, not the lists, limit it.
            index.set_nprobe(before[0])
            return before[1]
        before = (nprobe, got)
    return got


# -- building ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildConfig:
    factory: str  # with {nlist} to fill in
    reps: int
    overfetch: int  # 0: the first of OVERFETCHES that reaches target_recall
    nprobe: int  # 0: tuned for target_recall
    target_recall: float  # recall@10
    depth: int = 128  # images a search asks for (k_candidates): recall@10 is of that ranking's top 10
    target_deep: float = 0.9  # recall@100 (later pages)


Reader = Callable[..., Iterator[tuple[np.ndarray, np.ndarray]]]  # (ids or None) -> (ids, vecs) chunks
Rescorer = Callable[["AnnIndex", np.ndarray, int, "np.ndarray | None"], list[Candidates]]


def build(
    image_ids: np.ndarray, *, read: Reader, rescore: Rescorer, config: BuildConfig, dim: int, num_vectors: int,
    cancelled: Callable[[], bool] = lambda: False, seed: int = 0, n_queries: int = 128,
) -> AnnIndex | None:
    """An approximate index of the images `read` yields (`read(ids)`: those; `read()`: all).

    Trained on a sample of the library's own vectors; every image added; overfetch and nprobe
    tuned (where 0 in `config`) to the smallest that reach `target_recall` for the final ranking
    (candidates re-scored by `rescore`, as searches do) against exact max-sim, over sample
    queries near library images (an image's mean vector plus as much noise), whose exact top 10 are
    gathered while the images are added. The recall reached is recorded in the parameters.
    None where `cancelled()` turned true.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    reps = min(config.reps, num_vectors)
    nlist = choose_nlist(len(image_ids) * reps)
    params = AnnParams(
        factory=fill_factory(config.factory, nlist, dim), nlist=nlist, reps=reps, nprobe=config.nprobe or 1,
        overfetch=config.overfetch or OVERFETCHES[0], trained_on=len(image_ids),
    )
    n_train = min(len(image_ids), max(1, -(-max(256, TRAIN_POINTS_PER_LIST * nlist) // reps)))
    sample = np.sort(rng.choice(image_ids, n_train, replace=False)) if len(image_ids) else image_ids
    chunks = [v for _, v in read(sample)] if len(sample) else []
    train = np.concatenate(chunks) if chunks else np.zeros((0, num_vectors, dim), np.float32)
    if len(train) == 0:  # an empty library: any unit vectors will do until the first rebuild
        train = unit_rows(rng.standard_normal((256, num_vectors, dim)).astype(np.float32))
    index = AnnIndex.train(train, params, dim, num_vectors)
    n_q = min(n_queries, len(train)) if len(chunks) else 0  # queries near sampled images
    queries = None
    if n_q:
        centres = unit_rows(train[rng.choice(len(train), n_q, replace=False)].mean(axis=1))
        noise = unit_rows(rng.standard_normal(centres.shape).astype(np.float32))
        queries = unit_rows(centres + noise)  # ~0.7 cosine to the image's mean: a loose query
    deep = min(100, max(10, config.depth))
    best = TopK(n_q, deep)
    for ids, vecs in read():
        if cancelled():
            return None
        index.add(ids, vecs)
        if queries is not None:
            best.push(ids, max_sim(vecs, queries))
    recall = None
    if queries is not None:
        truth = best.ids()

        def measure(ix: AnnIndex) -> Recall:
            found = rescore(ix, queries, max(10, config.depth), None)

            def share(n: int) -> float:
                return float(np.mean([len(np.intersect1d(f.ids[:n], t[:n])) / max(1, len(t[:n])) for f, t in zip(found, truth)]))

            return Recall(share(10), share(deep))

        recall = tune(index, config, measure)
    index.params.recall_at_10 = None if recall is None else round(recall.at_10, 4)
    index.params.recall_deep = None if recall is None else round(recall.deep, 4)
    index.params.recall_queries = n_q
    index.params.build_s = round(time.perf_counter() - t0, 2)
    index.params.bytes_per_image = round(index.bytes_per_image(), 1)
    log.info("built the approximate vector index: %s", index.describe())
    return index


def tune(index: AnnIndex, config: BuildConfig, recall: Callable[[AnnIndex], Recall]) -> Recall:
    """Set the overfetch and nprobe that `config` leaves at 0 on `index`, and return the
    recall measured there.

    Each overfetch of OVERFETCHES in turn gets its nprobe tuned; of those that reach both
    targets, the one whose sample queries ran fastest wins (fewer candidates read from the
    store against more lists probed: only timing says which costs more), else the one that
    came closest. Stops at a pair that reaches them at the least nprobe to try: more
    candidates cannot beat it.
    """
    tried = []  # (reached, -seconds, margin, -overfetch, nprobe, recall)
    for overfetch in (config.overfetch,) if config.overfetch else OVERFETCHES:
        index.params.overfetch = overfetch
        got = tune_nprobe(index, config, recall) if config.nprobe == 0 else recall(index)
        reached = got.margin(config) >= 0
        seconds = min(_timed(recall, index) for _ in range(2)) if reached else 0.0
        tried.append((reached, -seconds, got.margin(config), -overfetch, index.params.nprobe, got))
        if reached and (config.nprobe or index.params.nprobe <= min(NPROBES[0], index.params.nlist)):
            break
    best = max(tried, key=lambda t: t[:5]) if any(t[0] for t in tried) else max(tried, key=lambda t: (t[2], t[3]))
    index.params.overfetch = -best[3]
    index.set_nprobe(best[4])
    return best[5]


def _timed(f: Callable[[AnnIndex], float], index: AnnIndex) -> float:
    t0 = time.perf_counter()
    f(index)
    return time.perf_counter() - t0


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def max_sim(vecs: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """ITC scores [n, T]: the best inner product of each image's vectors [n, Q, D] with each
    query vector [T, D]."""
    return np.einsum("nqd,td->nqt", vecs, queries, optimize=True).max(axis=1)


class TopK:
    """The k best (score, id) seen so far for each of n_q queries, ties by smaller id."""

    def __init__(self, n_q: int, k: int) -> None:
        self.k = k
        self._ids = [np.zeros(0, np.int64) for _ in range(n_q)]
        self._scores = [np.zeros(0, np.float32) for _ in range(n_q)]

    def push(self, ids: np.ndarray, scores: np.ndarray) -> None:
        for t in range(len(self._ids)):
            i = np.concatenate([self._ids[t], ids])
            sc = np.concatenate([self._scores[t], scores[:, t]])
            order = np.lexsort((i, -sc))[: self.k]
            self._ids[t], self._scores[t] = i[order], sc[order]

    def ids(self) -> list[np.ndarray]:
        return self._ids


def fill_factory(template: str, nlist: int, dim: int) -> str:
    """The FAISS factory string for this library: {nlist} filled in, and a PQ's number of
    sub-quantizers lowered to one that divides the dimension."""
    factory = template.format(nlist=nlist)

    def fit(m: re.Match) -> str:
        n = int(m.group(1))
        while dim % n:
            n -= 1
        return f"PQ{n}"

    return re.sub(r"PQ(\d+)", fit, factory)


