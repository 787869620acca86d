"""The vector index in its tiers: the exact scan for a small library, the approximate index
(`ann.json` names its file) for a large one, the GPU copy; loading, saving, searching, and
re-indexing into another tier in the background while queries go on."""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from searchengine.store.records import ModelInfo
from searchengine.vectors import ann
from searchengine.vectors.ann import AnnIndex, max_sim
from searchengine.vectors.exact import Candidates, VectorIndex

log = logging.getLogger(__name__)


class VectorTiers:
    """The Library's vector index: one part of `Library` (searchengine.library.core), which holds
    the state it shares with the write order (the index, its lock, the write count)."""

    def _refresh_gpu(self) -> None:
        if self.gpu is not None:
            with self.lock:
                self.gpu.refresh(self.index, self._writes)

    def _load_vector_index(self, info: ModelInfo, verify: bool = True) -> tuple[VectorIndex | AnnIndex | None, str | None]:
        """The vector index on disk: the approximate tier where `ann.json` names one (unless
        the exact tier is forced), else the exact one; (None, None) where neither is usable.
        `verify`: an exact index whose sample of vectors is not the store's is not usable
        (`check` loads it as it is, and compares every image)."""
        s = self.settings
        if s.vector_tier != "exact":
            try:
                entry = ann.read_manifest(s.ann_manifest_path)
                if entry is not None:
                    name, params = entry
                    return AnnIndex.load(Path(s.data_dir) / name, params, info.dim, info.num_vectors), name
            except Exception as e:  # noqa: BLE001 - a damaged derived file is rebuilt, never trusted
                log.warning("the approximate vector index named by %s is unreadable (%s); rebuilding it", s.ann_manifest_path, e)
        path = s.vectors_path
        if path.exists():
            try:
                index = VectorIndex.load(path, info.dim, info.num_vectors)
            except Exception as e:  # a damaged derived file is rebuilt, never trusted
                log.warning("vector index %s is unreadable (%s); rebuilding it from the store", path, e)
            else:
                if not index.holds_float16_values():
                    log.info("vector index %s predates float16 vectors; rebuilding it from the store", path)
                elif verify and index.differs_on_a_sample(self.store.image_ids(), self.store.iter_vectors):
                    log.warning("vector index %s holds other vectors than the store's for the same images "
                                "(a file from another library?); rebuilding it from the store", path)
                else:
                    return index, None
        return None, None

    def _index_path(self) -> Path | None:
        """The file the index in use is saved to (None: an approximate index not yet saved)."""
        if isinstance(self.index, AnnIndex):
            return Path(self.settings.data_dir) / self._ann_file if self._ann_file else None
        return self.settings.vectors_path

    def _sweep_tier_files(self) -> None:
        """Drop the files of the tier not in use, and approximate-index files no manifest
        names (a rebuild cut short): only while no rebuild of any process is under way."""
        with self._tier_lock(blocking=False) as held:
            if not held:
                return
            data_dir = Path(self.settings.data_dir)
            keep = self._ann_file if isinstance(self.index, AnnIndex) else None
            named = self._manifest_file()
            for f in data_dir.glob("ann-*.faiss"):
                if f.name not in (keep, named):
                    f.unlink(missing_ok=True)
            if isinstance(self.index, AnnIndex) and self._ann_file and named == self._ann_file:
                self.settings.vectors_path.unlink(missing_ok=True)

    def _follow_manifest(self) -> None:
        """Load the approximate index another process's rebuild put in place, if any."""
        entry = self._manifest() if self.settings.vector_tier != "exact" else None
        if entry is None or entry[0] == self._ann_file or self.rebuilding:
            return
        name, params = entry
        info = self.store.model_info()
        try:
            self.index = AnnIndex.load(Path(self.settings.data_dir) / name, params, info.dim, info.num_vectors)
            self._ann_file = name
            self._writes += 1
            self._refresh_gpu()
            log.info("loaded the vector index another process rebuilt (%s)", name)
        except Exception as e:  # noqa: BLE001 - keep the index in use
            log.warning("cannot load the rebuilt vector index %s (%s); keeping the one in use", name, e)

    def maybe_save(self) -> None:
        if self._dirty and time.monotonic() - self._last_save >= self.settings.save_every_s:
            self.save()

    def save(self) -> None:
        if self.index is None or not self.writable:
            return
        with self.lock:
            path = self._index_path()
            if path is None:  # an approximate index built for this process: give it a file
                name = ann.new_file_name()
                self.index.save(Path(self.settings.data_dir) / name)
                with self._tier_lock(blocking=False) as held:
                    if not held:  # another process is rebuilding: its index will take over
                        (Path(self.settings.data_dir) / name).unlink(missing_ok=True)
                        return
                    ann.write_manifest(self.settings.ann_manifest_path, name, self.index.params)
                    self._ann_file = name
            elif isinstance(self.index, AnnIndex) and self._manifest_file() != self._ann_file:
                return  # another process's rebuild took over: `refresh` loads it
            else:
                self.index.save(path)
        self._last_save = time.monotonic()
        self._dirty = False
        self._refresh_gpu()  # writes are in: searches go back to the GPU copy

    def _manifest(self) -> tuple[str, ann.AnnParams] | None:
        """(file name, parameters) from `ann.json`; None where there is none or it is
        unreadable (the next rebuild replaces it)."""
        try:
            return ann.read_manifest(self.settings.ann_manifest_path)
        except Exception:  # noqa: BLE001
            return None

    def _manifest_file(self) -> str | None:
        entry = self._manifest()
        return entry[0] if entry else None

    @contextmanager
    def _tier_lock(self, blocking: bool = True) -> Iterator[bool]:
        """One rebuild of the vector index per data dir, across processes (flock on
        `ann.lock`); yields whether it is held (False: not blocking and taken)."""
        import fcntl

        fd = os.open(Path(self.settings.data_dir) / "ann.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def _wanted_tier(self, n: int, current: str | None) -> str:
        """The tier for n images: as forced, else exact below `ann_threshold` (and, once
        approximate, until the library shrinks below half of it, so it does not flip)."""
        s = self.settings
        if s.vector_tier != "auto":
            return s.vector_tier
        if current == "ann":
            return "ann" if n >= s.ann_threshold // 2 else "exact"
        return "ann" if n >= s.ann_threshold else "exact"

    def needs_rebuild(self) -> str | None:
        """The tier to rebuild into, or None while the index in use fits the library: another
        tier, or an approximate index trained at under a quarter of the library's size."""
        if self.index is None:
            return None
        n = len(self.index)
        want = self._wanted_tier(n, self.index.tier)
        if want != self.index.tier:
            return want
        if isinstance(self.index, AnnIndex) and n > 4 * max(self.index.params.trained_on, 1):
            return "ann"
        return None

    @property
    def rebuilding(self) -> bool:
        return self._rebuild is not None and self._rebuild.is_alive()

    def maybe_retier(self, wait: bool = False) -> None:
        """Start re-indexing into the tier the library's size wants, in the background (where
        this library does that), or at once with `wait`; queries go on meanwhile."""
        if not self.writable or (not self.background_rebuilds and not wait) or self.needs_rebuild() is None:
            return
        if not self.rebuilding:
            self._cancel.clear()
            self._rebuild = threading.Thread(target=self._retier, name="vector-index-rebuild", daemon=True)
            self._rebuild.start()
        if wait:
            self._rebuild.join()

    def _retier(self) -> None:
        """Build the index the library's size wants from the store, then swap it in: the new
        file first, then (under the index lock, after a last catch-up with the writes made
        meanwhile) the manifest, which is when it takes over, then the old file goes."""
        try:
            with self._tier_lock(blocking=False) as held:
                if not held:
                    log.info("another process is rebuilding the vector index; this one keeps its own")
                    return
                want = self.needs_rebuild()
                if want is None:
                    return
                info = self.store.model_info()
                new = self._build_ann(info) if want == "ann" else self._build_exact(info)
                if new is None:  # cancelled
                    return
                self._sync(new, self.store.image_ids())  # what was written during the build
                data_dir = Path(self.settings.data_dir)
                name = ann.new_file_name() if want == "ann" else None
                new.save(data_dir / name if name else self.settings.vectors_path)
                with self.lock:
                    late = self._sync(new, self.store.image_ids())  # the last few, under the lock
                    old_file = self._ann_file
                    if name:
                        ann.write_manifest(self.settings.ann_manifest_path, name, new.params)
                    else:
                        self.settings.ann_manifest_path.unlink(missing_ok=True)
                    self.index, self._ann_file = new, name
                    self._dirty = any(late)
                    self._writes += 1
                    if not self._dirty:
                        self._refresh_gpu()
                    if name:
                        self.settings.vectors_path.unlink(missing_ok=True)
                    if old_file and old_file != name:
                        (data_dir / old_file).unlink(missing_ok=True)
                log.info("the vector index is now %s (%d images)", new.tier, len(new))
            if self._dirty:
                self.save()
        except Exception:  # noqa: BLE001 - the index in use stays; the next start tries again
            log.exception("rebuilding the vector index failed; the index in use stays")

    def _build_exact(self, info: ModelInfo) -> VectorIndex | None:
        index = VectorIndex(info.dim, info.num_vectors)
        for ids, vecs in self.store.iter_vectors():
            if self._cancel.is_set():
                return None
            index.add(ids, vecs)
        return index

    def _build_ann(self, info: ModelInfo) -> AnnIndex | None:
        """An approximate index of every stored vector (see `ann.build`); None if cancelled."""
        s = self.settings
        return ann.build(
            self.store.image_ids(),
            read=self.store.iter_vectors,
            rescore=self._rescored,
            config=ann.BuildConfig(s.ann_factory, s.ann_reps, s.ann_overfetch, s.ann_nprobe, s.ann_target_recall, s.k_candidates, s.ann_target_recall_deep),
            dim=info.dim,
            num_vectors=info.num_vectors,
            cancelled=self._cancel.is_set,
        )

    def search_vectors(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, *, exact_scores: bool = True
    ) -> list[Candidates]:
        """Top k images by max-sim for each query vector [T, D] (see `VectorIndex.search`).

        In the approximate tier, its candidates are re-scored from the stored vectors, so the
        scores are exact; `exact_scores=False` skips that for callers that re-score what they
        keep themselves (image queries). A filter that leaves few images is scanned exactly.
        """
        with self.lock:
            index = self.index
            if not isinstance(index, AnnIndex):
                return index.search(queries, k, allowed, on=self._gpu_copy(index, k, allowed))
        queries = np.atleast_2d(queries)
        if allowed is not None and len(allowed) <= max(self.settings.exact_scan_max, k * index.params.overfetch):
            return self._scan(index, queries, np.asarray(allowed, dtype=np.int64), k)
        if not exact_scores:
            with self.lock:
                return index.search(queries, k, allowed, on=self._gpu_copy(index, k, allowed))
        return self._rescored(index, queries, k, allowed)

    def _gpu_copy(self, index, k: int, allowed):
        """The GPU copy of `index` where this search can run on it (call under the lock)."""
        if self.gpu is None:
            return None
        return self.gpu.copy_for(index, self._writes, index.vectors_for(k), allowed is not None)

    def _rescored(self, index: AnnIndex, queries: np.ndarray, k: int, allowed: np.ndarray | None) -> list[Candidates]:
        with self.lock:
            n = k * index.params.overfetch
            proposed = index.search(queries, n, allowed, on=self._gpu_copy(index, n, allowed) if index is self.index else None)
        return self._scan(index, queries, np.unique(np.concatenate([c.ids for c in proposed])), k, [c.ids for c in proposed])

    def _scan(
        self, index: AnnIndex, queries: np.ndarray, ids: np.ndarray, k: int, per_query: list[np.ndarray] | None = None
    ) -> list[Candidates]:
        """Exact top k by max-sim among images given by id, from the stored vectors (images
        gone from the store meanwhile drop out). per_query: each query's own candidates."""
        got_ids, vecs = self.store.read_vectors(ids, (index.num_vectors, index.dim))
        if not len(got_ids):
            return [Candidates(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in range(len(queries))]
        scores = max_sim(vecs, np.asarray(queries, np.float32))  # [n, T]
        out = []
        for t in range(len(queries)):
            keep = np.ones(len(got_ids), bool) if per_query is None else np.isin(got_ids, per_query[t])
            c_ids, c_scores = got_ids[keep], scores[keep, t]
            order = np.lexsort((c_ids, -c_scores))[:k]
            out.append(Candidates(c_ids[order], c_scores[order].astype(np.float32)))
        return out

    def indexed_ids(self) -> np.ndarray:
        """Every image id in the vector index."""
        with self.lock:
            return self.index.ids()

    def counts(self) -> tuple[int, int]:
        """(images, vectors) in the vector index (0, 0 without one)."""
        with self.lock:
            return (len(self.index), self.index.ntotal) if self.index is not None else (0, 0)

    def index_type(self) -> str:
        tier = self.vector_index_info()["tier"]
        if tier == "exact":
            return "exact (flat inner product, max over query vectors)"
        return "approximate (FAISS IVF candidates, re-scored exactly from the stored vectors)"

    def vector_index_info(self) -> dict:
        """The tier in use, its parameters, RAM per image and build-time recall@10."""
        index = self.index
        if index is None:  # `stats` loads no index: what the files say
            entry = self._manifest() if self.settings.vector_tier != "exact" else None
            if entry is None:
                info = self.store.model_info()
                return {"tier": "exact", **({"bytes_per_image": VectorIndex.ram_per_image(info.num_vectors, info.dim)} if info else {})}
            from dataclasses import asdict

            return {"tier": "ann", **asdict(entry[1])}
        device = "gpu" if self.gpu is not None and self.gpu.enabled else "cpu"
        if isinstance(index, AnnIndex):
            return {"tier": "ann", **index.describe(), "rebuilding": self.rebuilding, "device": device}
        per_image = VectorIndex.ram_per_image(index.num_vectors, index.dim)
        return {"tier": "exact", "bytes_per_image": per_image, "rebuilding": self.rebuilding, "device": device}
