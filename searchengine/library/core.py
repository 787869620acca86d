"""The data directory: the store (truth), the FAISS index (derived), the ViT feature cache,
the thumbnails and the previews (all three caches).

Write order, which is what makes a crash at any moment repairable:
1. one store transaction per batch: images, their vectors, their files (or failures);
2. feature cache and thumbnail files of the new images (whole-file renames; named by the ids
   from 1); previews are made on first request;
3. the in-memory FAISS index, saved atomically every `save_every_s` and at the end.
Deletions go store first, then FAISS, then the caches.

The vector index has two tiers (see searchengine/vectors/ann.py): an exact scan (`vectors.faiss`) for
a small library, an approximate index (`ann.json` names its file) for a large one, whose
candidates are re-scored exactly from the stored vectors. A library that outgrows its tier is
re-indexed in a background thread while queries go on; the new index takes over atomically
(`_retier`), and a crash at any moment leaves the old one in use.

On open, `reconcile` makes the FAISS index hold exactly the store's images: ids the store has
and the index lacks are added from the stored vectors, ids the store no longer has are
removed, and cache entries of gone images are deleted. A missing cache entry is recomputed
when it is needed. So a crash loses at most the batch in flight (never committed, so never
half-visible), and a restart repairs the rest.

A data directory that cannot be written (a read-only mount, a backup, `chmod -R a-w`) opens
read-only: the store is opened as it is (no journal-mode change, no upgrade), the FAISS file
is read but never saved (a stale one is reconciled in memory only), cache files are read and
never deleted, and thumbnails that are not there yet are made in a temporary folder of this
process. Commands that write ask for a writable library and are refused at once, with the
path that cannot be written.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from searchengine.config.settings import Settings
from searchengine.errors import IndexNotFoundError, ReadOnlyIndexError
from searchengine.library.health import Health
from searchengine.library.opening import (
    check_store_present,
    index_traces,
    open_store,
    store_exists,
    unwritable_path,
)
from searchengine.library.records import (
    ReconcileReport,
    Recorded,
    recorded_in,
)
from searchengine.library.reindexing import Reindexing
from searchengine.library.tiers import VectorTiers
from searchengine.media import links
from searchengine.media.links import LinkPolicy
from searchengine.media.thumbnails import PreviewCache, ThumbnailCache
from searchengine.store.records import ModelInfo, NewImage
from searchengine.store.schema import VECTOR_DTYPE
from searchengine.store.catalog import Catalog
from searchengine.store.writes import Store
from searchengine.util.filecache import sweep_temporary
from searchengine.vectors.ann import AnnIndex
from searchengine.vectors.exact import VectorIndex
from searchengine.vectors.feature_cache import FeatureCache
from searchengine.vectors.gpu import GpuMirror

log = logging.getLogger(__name__)


class Library(VectorTiers, Reindexing, Health):

    def __init__(self, settings: Settings, store: Store, *, writable: bool = True, vectors: bool = True) -> None:
        self.settings = settings
        self.store = store
        self.writable = writable
        self.index: VectorIndex | AnnIndex | None = None
        self._ann_file: str | None = None  # the approximate index's file, when that tier is in use
        # Re-indexing into another tier in a background thread (indexing and serving
        # processes; a one-shot search uses what is there). See `_retier`.
        self.background_rebuilds = False
        self._rebuild: threading.Thread | None = None
        self._cancel = threading.Event()
        self.gpu: GpuMirror | None = None  # the index's GPU copy for searches (see faiss_gpu)
        self._writes = 0  # changes to the index in memory: a GPU copy is current for one count
        self.features: FeatureCache | None = None
        self._next_features: FeatureCache | None = None  # a re-index's, for the new model
        self._model: ModelInfo | None = None  # the model the vector index is of
        # Each bound model's fingerprints: its own and those earlier versions took (`bind`).
        self._same_weights: list[frozenset[str]] = []
        self._foreign_features = False  # the feature cache may be another model's (see `model_changed`)
        self.thumbnails = ThumbnailCache(
            settings.thumbnails_dir, settings.thumbnail_size, settings.max_image_pixels, read_only=not writable
        )
        self.previews = PreviewCache(
            settings.previews_dir, settings.preview_size, settings.max_image_pixels, read_only=not writable
        )
        self._last_save = time.monotonic()
        self._last_backup = float("-inf")
        self._dirty = False
        # Guards the in-memory FAISS index: searches from server threads against reconcile.
        self.lock = threading.RLock()
        # The single writer lane: in-process writers (the indexer, the watcher of `serve
        # --watch`, captioning) take turns here rather than in SQLite's busy timeout. A batch
        # holds `lock` from its store commit to its vectors' arrival in FAISS, so a reconcile
        # in between cannot add the same ids a second time.
        self._write_lane = threading.Lock()
        # What everything else reads through: the store's reads, no write.
        self.catalog = Catalog(store.engine, read_only=store.read_only)
        self.revision = store.revision()
        info = store.model_info()
        # vectors=False: a reader that needs no vector index (stats, keyword search) skips
        # loading and reconciling FAISS; `bind` attaches it when a model is bound.
        if info is not None and vectors:
            self._attach(info)

    @classmethod
    def open(
        cls, settings: Settings, *, create: bool = False, writable: bool | None = None, vectors: bool = True
    ) -> "Library":
        """The library in `settings.data_dir`.

        create: make the directory and the store if there is none (else IndexNotFoundError):
        only `index` and `watch` do, so a typo in --data-dir never starts an empty index.
        writable: True for commands that write (ReadOnlyIndexError at once where the directory
        cannot be written); False to open read-only; None (readers) for read-only exactly when
        the directory cannot be written, so a reader on a writable index still saves a
        repaired FAISS file for the next one.
        vectors: False for readers that need no vector index (stats, keyword search): FAISS is
        neither loaded nor reconciled until a model is bound.
        """
        data_dir = Path(settings.data_dir)
        check_store_present(settings)
        if not create and not store_exists(settings):
            raise IndexNotFoundError(
                f"no index in {data_dir}: run `searchengine index FOLDER` first, or point --data-dir at one"
            )
        blocked = unwritable_path(settings)
        reader = writable is None  # a reader takes the index as it finds it
        if writable is None:
            writable = blocked is None
        if writable:
            cls.check_writable(settings)
            data_dir.mkdir(parents=True, exist_ok=True)
            try:
                return cls(settings, open_store(settings, read_only=False), vectors=vectors)
            except OSError as e:
                if not (reader and e.errno == errno.ENOSPC and store_exists(settings)):
                    raise
                # A full disk: a reader still reads, read-only, changing nothing.
                log.warning("the disk holding %s is full; reading the index read-only", data_dir)
                return cls(settings, open_store(settings, read_only=True, no_room=True), writable=False, vectors=vectors)
        if not store_exists(settings):
            # create=True but nothing may be written: there is no index to read either.
            raise ReadOnlyIndexError(
                f"no index in {data_dir}, and {blocked or data_dir} is not writable, so none can be made there"
            )
        return cls(settings, open_store(settings, read_only=True), writable=False, vectors=vectors)

    @staticmethod
    def check_writable(settings: Settings) -> None:
        """ReadOnlyIndexError naming the path, where a write command could not write the index.

        Cheap (no store is opened), so a command can call it before loading any model.
        """
        blocked = unwritable_path(settings)
        if blocked is not None:
            raise ReadOnlyIndexError(
                f"{blocked} is not writable, and this command writes to the index in {settings.data_dir}: "
                "make it writable (a read-only mount or a backup can be searched, not updated), "
                "or pass --data-dir with a writable folder"
            )

    @classmethod
    def recorded(cls, settings: Settings) -> Recorded | None:
        """The model and captioner an existing index was built with (None: no index there),
        read without loading anything else, so a command can choose its models first."""
        if not store_exists(settings) and not index_traces(settings):
            return None
        check_store_present(settings)
        # A read-only index is read as `open` would, without a write.
        store = open_store(settings, read_only=unwritable_path(settings) is not None)
        try:
            return recorded_in(store)
        finally:
            store.close()

    def built_with(self) -> Recorded:
        """What this index remembers of how it was built (see `recorded`)."""
        return recorded_in(self.store)

    def record_captioner(self, captions: bool, model: str | None) -> None:
        """Remember how this index is captioned, so later runs default to the same."""
        self.store.record_captioner(captions, model)

    @property
    def link_policy(self) -> LinkPolicy:
        """Which symlinks lead into this library: the setting, else what the index was built
        with, else the default (see searchengine.media.links)."""
        return self.settings.links or self.store.link_policy() or links.DEFAULT

    def record_link_policy(self) -> None:
        """Remember a link policy given for this run, so later runs (serve) default to it."""
        if self.settings.links is not None and self.settings.links != self.store.link_policy():
            self.store.record_link_policy(self.settings.links)

    def inside(self, path: str, real: str | None = None) -> bool:
        """Whether an indexed file's path resolves inside the library under its link policy
        (`real`: the real path of the file opened through it, see `links.inside_library`)."""
        return links.inside_library(path, self.catalog.roots(), self.link_policy, real)

    def __enter__(self) -> "Library":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._cancel.set()  # a rebuild in progress is dropped; the next start does it again
        if self._rebuild is not None:
            self._rebuild.join()
        self.store.close()
        self.thumbnails.close()
        self.previews.close()

    def bind(self, info: ModelInfo, former: Iterable[str] = ()) -> None:
        """Tie the library to the model that writes its vectors, recording it on first use
        (refused if the index was built with another one). `former`: fingerprints earlier
        versions took of the same weights (`Store.bind_model`)."""
        self.store.bind_model(info, former)
        self._use(info, former)

    def use_model(self, info: ModelInfo, former: Iterable[str] = ()) -> None:
        """Tie the library to the model that searches it, without writing: refused if the index
        was built with another one; an index with no model yet stays without one."""
        self.store.check_model(info, former)
        self._use(info, former)

    def _use(self, info: ModelInfo, former: Iterable[str]) -> None:
        self._same_weights.append(frozenset({info.fingerprint, *former}))
        if self.index is None:
            self._attach(self.store.model_info() or info)

    def _attach(self, info: ModelInfo) -> None:
        # After a re-index's swap (`swap_in_reindex`), the vector index and feature cache on
        # disk are the old model's: not loaded, replaced (by a writer) or bypassed (a reader).
        stale = self.store.derived_stale()
        if stale and self.writable:
            self._drop_derived_files()
        self._model = info
        self._foreign_features = False
        self.index, self._ann_file = self._load_vector_index(info) if not stale else (None, None)
        if self.index is None:
            n = len(self.store.image_ids())
            if self._wanted_tier(n, None) == "ann":
                # Too large to scan, and no usable approximate index: build one now.
                if n:
                    log.warning("building the approximate vector index of %d images from the store (a minute per ~100k)", n)
                self.index = self._build_ann(info)
                self._ann_file = None
            else:
                self.index = VectorIndex(info.dim, info.num_vectors)
        self.features = self._feature_cache(info, stale)
        report = self.reconcile()
        if self.writable:
            swept = sweep_temporary(Path(self.settings.data_dir).glob(".*.tmp"))
            swept += sum(c.sweep() for c in (self.features, self.thumbnails, self.previews))
            if swept:
                log.info("removed %d temporary files left by a process that is gone", swept)
        if self.writable and (stale or report.changed or self._index_path() is None or not self._index_path().exists()):
            try:
                self.save()
                if stale:
                    self.store.derived_rebuilt()
            except OSError as e:  # a full disk: reading goes on from the index in memory
                log.warning("cannot save the vector index (%s); it is rebuilt from the store next time", e)
        if self.writable:
            self._sweep_tier_files()
        self.gpu = GpuMirror(self.settings.vector_device)
        self.gpu.refresh(self.index, self._writes)

    def refresh(self) -> ReconcileReport | None:
        """Catch up with writes another process (an indexer) committed since we last looked;
        after another process's re-index, with its model (see `model_changed`)."""
        revision = self.store.revision()
        if self.index is None:  # no model bound yet: nothing to keep in step
            return None
        if revision != self.revision and self.model_changed():
            with self.lock:
                self.revision = revision
                self._writes += 1
                self._attach(self.store.model_info())
                return ReconcileReport(added=len(self.index))
        # Another process's rebuild may have put a new approximate index in place.
        rebuilt = self.settings.vector_tier != "exact" and self._manifest_file() not in (None, self._ann_file)
        if revision == self.revision and not rebuilt:
            return None
        with self.lock:
            self.revision = revision
            self._follow_manifest()
            return self._reconcile()

    def model_changed(self) -> bool:
        """True when the store's model is no longer the one this library was opened with (a
        re-index took over): searches must encode with the new model from then on."""
        info = self.store.model_info()
        changed = (
            info is not None and self._model is not None and info.fingerprint != self._model.fingerprint
            # a writer bringing an earlier version's fingerprint of these weights up to date
            and not any({info.fingerprint, self._model.fingerprint} <= same for same in self._same_weights)
        )
        # The feature cache on disk may be the new model's already: not read, nor written, by
        # the old one in the meantime.
        self._foreign_features = changed
        return changed

    def reconcile(self) -> ReconcileReport:
        with self.lock:
            return self._reconcile()

    def _reconcile(self) -> ReconcileReport:
        assert self.index is not None
        report = ReconcileReport()
        store_ids = self.store.image_ids()
        report.added, report.removed = self._sync(self.index, store_ids)
        present = set(store_ids.tolist())
        # A read-only library leaves stale cache entries on disk: it never asks for them (the
        # ids are gone from the store), and the next writer drops them.
        for cache in (self.features, self.thumbnails, self.previews) if self.writable else ():
            if cache is not None:
                stale = cache.ids() - present
                cache.delete(stale)
                report.cache_dropped += len(stale)
        if report.changed or report.cache_dropped:
            log.info("reconciled the vector index with the store: %s", report)
            self._dirty = True
            self._writes += 1
        return report

    def _sync(self, index: VectorIndex | AnnIndex, store_ids: np.ndarray) -> tuple[int, int]:
        """Make `index` hold exactly `store_ids` (from the stored vectors): (added, removed)."""
        index_ids = index.ids()
        extra = np.setdiff1d(index_ids, store_ids)
        missing = np.setdiff1d(store_ids, index_ids)
        removed = index.remove(extra) if len(extra) else 0
        added = 0
        for ids, vecs in self.store.iter_vectors(missing):
            index.add(ids, vecs)
            added += len(ids)
        return added, removed

    def require_writable(self, why: str = "it cannot be changed") -> None:
        """ReadOnlyIndexError where this library was opened read-only: naming the path that
        cannot be written where one is to blame, else saying `why` a write was asked for."""
        if not self.writable:
            Library.check_writable(self.settings)
            raise ReadOnlyIndexError(f"the index in {self.settings.data_dir} was opened read-only; {why}")

    def record_mount(self, root: str, mounted: bool) -> None:
        if self.writable and (root in self.store.mounted_roots()) != mounted:
            self.store.record_mount(root, mounted)

    def record_made_by(self, made_by: str) -> None:
        """Note how the model ran ("bfloat16 on cuda") that made vectors being written."""
        self.require_writable()
        self.store.record_made_by(made_by)

    def write_batch(
        self,
        new: Sequence[NewImage] = (),
        links: Sequence[tuple[str, int, int, str]] = (),
        failures: Sequence[tuple[str, int, int, str, str]] = (),
    ) -> list[int]:
        """Commit one batch in the write order above; return the new images' ids.

        new: embedded images; links: (path, size, mtime_ns, sha256) of files whose content is
        indexed already; failures: (path, size, mtime_ns, reason, message). Images left with
        no file (a path that now holds other content, or failed) are forgotten.
        """
        self.require_writable()
        if not (new or links or failures):
            return []
        with self._write_lane, self.lock:
            new_ids, orphans = self.store.write_batch(
                new_images=new, links=links, failures=failures
            )
            # An id of None: another writer of a shared database indexed that content first,
            # and the store linked the file to theirs.
            made = [(image_id, n) for image_id, n in zip(new_ids, new) if image_id is not None]
            if made:
                kept = [(image_id, n.vit) for image_id, n in made if n.vit is not None]
                if kept:  # the ViT output of those the indexer keeps it for
                    self.cache_vit(*zip(*kept))
                for image_id, n in made:  # best effort: one that cannot be kept is made on request
                    self.thumbnails.put(image_id, n.thumbnail)
                self.add_vectors([i for i, _ in made], np.stack([n.itc for _, n in made]))
            self.forget_images(orphans)
        return [i for i in new_ids if i is not None]

    def remove_files(self, paths: Sequence[str]) -> list[int]:
        """Forget these paths (gone from disk); images left with no file go too, from the store
        first, then FAISS and the caches. Returns the ids of the images that went."""
        self.require_writable()
        with self._write_lane, self.lock:
            orphans = self.store.remove_files(paths)
            self.forget_images(orphans)
        return orphans

    def set_captions(self, rows: Sequence[tuple[int, str | None, str, str | None]]) -> None:
        """Store captions: (image id, caption or None, caption model, error or None)."""
        self.require_writable()
        with self._write_lane:
            self.store.set_captions(rows)

    def add_vectors(self, ids: list[int], vecs: np.ndarray) -> None:
        self.require_writable()
        assert self.index is not None
        # The values the store keeps (float16), so that every tier scores what re-scoring reads.
        vecs = np.asarray(vecs).astype(VECTOR_DTYPE).astype(np.float32)
        with self.lock:
            self.index.add(np.asarray(ids), vecs)
            self._writes += 1
            self._dirty = True
        self.maybe_save()
        self.maybe_retier()

    def forget_images(self, ids: list[int]) -> None:
        """After the store deleted these images: drop their vectors and cache entries."""
        if not ids:
            return
        self.require_writable()
        if self.index is not None:
            with self.lock:
                self.index.remove(ids)
                self._writes += 1
        if self.features is not None:
            self.features.delete(ids)
        self.thumbnails.delete(ids)
        self.previews.delete(ids)
        self._dirty = True
        self.maybe_retier()

    @property
    def thumbnail_format(self) -> tuple[int, int]:
        """(longest side in px, JPEG quality) of the thumbnails `write_batch` takes."""
        return self.thumbnails.size, self.thumbnails.quality

    @property
    def keeps_features(self) -> bool:
        """Whether `write_batch` stores the ViT output it is given (the feature cache)."""
        return self.features is not None

    def add_root(self, path: str) -> None:
        self.require_writable()
        with self._write_lane:
            self.store.add_root(path)

    def image_count(self) -> int:
        """Images in the store (whether or not a vector index is loaded)."""
        return len(self.store.image_ids())

    def thumbnail(self, image_id: int, read: Callable[[], bytes]) -> bytes:
        """The image's thumbnail (JPEG), made from its original (`read`) if not kept yet."""
        return self.thumbnails.get(image_id, read)

    def preview(self, image_id: int, read: Callable[[], bytes]) -> bytes:
        """The image's screen-sized preview (JPEG), made from its original (`read`) if not kept yet."""
        return self.previews.get(image_id, read)

    def vectors_of(self, image_id: int) -> np.ndarray | None:
        """An image's stored ITC vectors [Q, D] (None: no such image)."""
        stored = list(self.store.iter_vectors([image_id]))
        return stored[0][1][0] if stored else None
