"""The data directory: the store (truth), the FAISS index (derived), the ViT feature cache,
the thumbnails and the previews (all three caches).

Write order, which is what makes a crash at any moment repairable:
1. one store transaction per batch: images, their vectors, their files (or failures);
2. feature cache and thumbnail files of the new images (whole-file renames; named by the ids
   from 1); previews are made on first request;
3. the in-memory FAISS index, saved atomically every `save_every_s` and at the end.
Deletions go store first, then FAISS, then the caches.

On open, `reconcile` makes the FAISS index hold exactly the store's images: ids the store has
and the index lacks are added from the stored vectors, ids the store no longer has are
removed, and cache entries of gone images are deleted. A missing cache entry is recomputed
when it is needed. So a crash loses at most the batch in flight (never committed, so never
half-visible), and a restart repairs the rest.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from searchengine.errors import IndexNotFoundError
from searchengine.features import FeatureCache
from searchengine.settings import Settings
from searchengine.store import FolderCount, ModelInfo, Store, sqlite_url
from searchengine.thumbnails import PreviewCache, ThumbnailCache
from searchengine.vector_index import VectorIndex

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    added: int = 0
    removed: int = 0
    cache_dropped: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


class Library:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.index: VectorIndex | None = None
        self.features: FeatureCache | None = None
        self.thumbnails = ThumbnailCache(settings.thumbnails_dir, settings.thumbnail_size, settings.max_image_pixels)
        self.previews = PreviewCache(settings.previews_dir, settings.preview_size, settings.max_image_pixels)
        self._last_save = time.monotonic()
        self._dirty = False
        # Guards the in-memory FAISS index: searches from server threads against reconcile.
        self.lock = threading.RLock()
        self.revision = store.revision()
        info = store.model_info()
        if info is not None:
            self._attach(info)

    @classmethod
    def open(cls, settings: Settings, *, create: bool = False) -> "Library":
        data_dir = Path(settings.data_dir)
        if not create and not settings.store_path.exists():
            raise IndexNotFoundError(
                f"no index in {data_dir}: run `searchengine index FOLDER` first, or point --data-dir at one"
            )
        data_dir.mkdir(parents=True, exist_ok=True)
        return cls(settings, Store.open(sqlite_url(settings.store_path)))

    def close(self) -> None:
        self.store.close()

    def bind(self, info: ModelInfo) -> None:
        """Tie the library to a model (refused if it was built with another one)."""
        self.store.bind_model(info)
        if self.index is None:
            self._attach(info)

    def _attach(self, info: ModelInfo) -> None:
        path = self.settings.vectors_path
        index = None
        if path.exists():
            try:
                index = VectorIndex.load(path, info.dim, info.num_vectors)
            except Exception as e:  # a damaged derived file is rebuilt, never trusted
                log.warning("vector index %s is unreadable (%s); rebuilding it from the store", path, e)
        self.index = index or VectorIndex(info.dim, info.num_vectors)
        self.features = FeatureCache(self.settings.features_dir, info.vit_shape)
        report = self.reconcile()
        if report.changed or not path.exists():
            self.save()

    def refresh(self) -> ReconcileReport | None:
        """Catch up with writes another process (an indexer) committed since we last looked."""
        revision = self.store.revision()
        if revision == self.revision:
            return None
        if self.index is None:  # no model bound yet: nothing to keep in step
            return None
        with self.lock:
            self.revision = revision
            return self._reconcile()

    def reconcile(self) -> ReconcileReport:
        with self.lock:
            return self._reconcile()

    def _reconcile(self) -> ReconcileReport:
        assert self.index is not None
        report = ReconcileReport()
        store_ids = self.store.image_ids()
        index_ids = self.index.ids()
        extra = np.setdiff1d(index_ids, store_ids)
        missing = np.setdiff1d(store_ids, index_ids)
        if len(extra):
            report.removed = self.index.remove(extra)
        for ids, vecs in self.store.iter_vectors(missing):
            self.index.add(ids, vecs)
            report.added += len(ids)
        present = set(store_ids.tolist())
        for cache in (self.features, self.thumbnails, self.previews):
            if cache is not None:
                stale = cache.ids() - present
                cache.delete(stale)
                report.cache_dropped += len(stale)
        if report.changed or report.cache_dropped:
            log.info("reconciled the vector index with the store: %s", report)
            self._dirty = True
        return report

    # -- writes ---------------------------------------------------------------------------

    def add_vectors(self, ids: list[int], vecs: np.ndarray) -> None:
        assert self.index is not None
        with self.lock:
            self.index.add(np.asarray(ids), vecs)
            self._dirty = True
        self.maybe_save()

    def forget_images(self, ids: list[int]) -> None:
        """After the store deleted these images: drop their vectors and cache entries."""
        if not ids:
            return
        if self.index is not None:
            with self.lock:
                self.index.remove(ids)
        if self.features is not None:
            self.features.delete(ids)
        self.thumbnails.delete(ids)
        self.previews.delete(ids)
        self._dirty = True

    def maybe_save(self) -> None:
        if self._dirty and time.monotonic() - self._last_save >= self.settings.save_every_s:
            self.save()

    def save(self) -> None:
        if self.index is None:
            return
        with self.lock:
            self.index.save(self.settings.vectors_path)
        self._last_save = time.monotonic()
        self._dirty = False

    # -- reads ----------------------------------------------------------------------------

    def folders(self) -> list[FolderCount]:
        """Every folder with indexed images below it, subfolders included (see `Store.folders`)."""
        return self.store.folders()

    def folder_has_images(self, folder: str) -> bool:
        """Whether a folder filter (a path or a folder's name) matches any indexed file."""
        return self.store.folder_has_images(folder)

    # -- description ----------------------------------------------------------------------

    def describe(self, max_failures: int = 20) -> dict:
        """What `stats` shows: counts, failures by reason, model, index, sizes on disk, captions."""
        stats = self.store.stats(max_failures)
        model = stats.model
        return {
            "data_dir": str(self.settings.data_dir),
            "images": stats.images,
            "files": stats.files,
            "failed": stats.failed,
            "failures_by_reason": stats.failures_by_reason,
            "failures": [{"path": p, "reason": r, "error": e} for p, r, e in stats.failures],
            "roots": stats.roots,
            "model": model.name if model else None,
            "model_fingerprint": model.fingerprint if model else None,
            "model_dtype": model.dtype if model else None,
            "index_type": "exact (flat inner product, max over query vectors)",
            "vectors": self.index.index.ntotal if self.index else 0,
            "bytes_on_disk": self.sizes_on_disk(),
            "captioned": stats.captioned,
            "caption_models": stats.caption_models,
            "caption_failures": stats.caption_failures,
        }

    # -- sizes ----------------------------------------------------------------------------

    def sizes_on_disk(self) -> dict[str, int]:
        s = self.settings

        def size(p: Path) -> int:
            return p.stat().st_size if p.exists() else 0

        store = sum(size(Path(str(s.store_path) + suffix)) for suffix in ("", "-wal", "-shm"))
        return {
            "store": store,
            "vector_index": size(s.vectors_path),
            "feature_cache": self.features.size_bytes() if self.features else 0,
            "thumbnails": self.thumbnails.size_bytes(),
            "previews": self.previews.size_bytes(),
        }



def model_info(model) -> ModelInfo:
    """What the store records about the model that makes its vectors."""
    return ModelInfo(
        name=model.name,
        fingerprint=model.fingerprint,
        num_vectors=model.num_query_tokens,
        dim=model.embed_dim,
        vit_shape=model.vit_shape,
        dtype=str(model.vision_dtype).replace("torch.", ""),
    )
