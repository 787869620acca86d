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
import os
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from searchengine.vectors import ann
from searchengine.store import backup
from searchengine.media import links
from searchengine.vectors.ann import AnnIndex, max_sim
from searchengine.errors import (
    IndexNotFoundError, ReadOnlyIndexError, SearchEngineError, StoreDamagedError, StoreMissingError,
)
from searchengine.vectors.gpu import GpuMirror
from searchengine.vectors.feature_cache import FeatureCache
from searchengine.util.filecache import sweep_temporary
from searchengine.media.imageio import ImageMeta
from searchengine.media.links import LinkPolicy
from searchengine.config.settings import Settings
from searchengine.media.keywords import Clause, KeywordQuery
from searchengine.store.schema import VECTOR_DTYPE
from searchengine.store.records import FileState, FolderCount, ImageRecord, ModelInfo
from searchengine.store.writes import Store
from searchengine.store.connection import sqlite_readonly_url, sqlite_url
from searchengine.store.textindex import KeywordHit
from searchengine.media.thumbnails import PreviewCache, ThumbnailCache
from searchengine.vectors.exact import Candidates, VectorIndex, write_atomic

log = logging.getLogger(__name__)

MODEL_TAG = "model"  # in a re-index's feature cache: the fingerprint of the model it was filled by, once complete


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


@dataclass
class ReconcileReport:
    added: int = 0
    removed: int = 0
    cache_dropped: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


@dataclass(frozen=True)
class IndexedFile:
    path: str
    size: int
    mtime_ns: int  # size and mtime as indexed: a file that differs is not the indexed content


@dataclass(frozen=True)
class ImageDetail:
    """Everything the library knows of one image, with its files (oldest first)."""

    id: int
    files: list[IndexedFile]
    width: int
    height: int
    taken_at: str | None
    camera: str | None
    gps_lat: float | None
    gps_lon: float | None
    caption: str | None
    caption_model: str | None
    caption_error: str | None
    sha256: str = ""  # the indexed content's: what a file must still hash to, to be served as it


@dataclass(frozen=True)
class NewImage:
    """An embedded image for `Library.write_batch`: its content hash, metadata (caption
    included), ITC vectors [Q, D], ViT output (None: not cached), thumbnail JPEG, and file."""

    sha256: str
    meta: ImageMeta
    itc: np.ndarray
    vit: np.ndarray | None
    thumbnail: bytes
    file: tuple[str, int, int]  # path, size, mtime_ns


@dataclass(frozen=True)
class Recorded:
    """What an index remembers of how it was built: its model and its captioner."""

    model: ModelInfo | None
    captioner: tuple[bool, str | None] | None  # (captions on, caption model); None: never recorded
    roots: tuple[str, ...] = ()  # the folders it indexes


def unwritable_path(settings: Settings) -> Path | None:
    """The first part of the data directory this process cannot write, or None.

    The data directory itself (new files and renames happen there), then the store and its WAL
    files where they exist. A data directory that does not exist yet counts as its nearest
    existing parent, which must let it be created. os.access also sees a read-only mount
    (EROFS) and immutable files, which a permission check alone would miss when run as root.
    """
    data_dir = Path(settings.data_dir).expanduser().absolute()
    if not data_dir.exists():
        parent = data_dir.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        return None if os.access(parent, os.W_OK | os.X_OK) else parent
    if not os.access(data_dir, os.W_OK | os.X_OK):
        return data_dir
    store = settings.store_path
    store_files = () if settings.database_url else (store, Path(f"{store}-wal"), Path(f"{store}-shm"))
    for path in (*store_files, settings.vectors_path, settings.ann_manifest_path):
        if path.exists() and not os.access(path, os.W_OK):
            return path
    return None


def _open_store(settings: Settings, *, read_only: bool, no_room: bool = False) -> Store:
    """The store, or StoreDamagedError that says how to get it back."""
    if settings.database_url:  # a database server: its own durability, no backups of ours
        return Store.open(settings.database_url, read_only=read_only, location=settings.store_location)
    try:
        if read_only:
            url = sqlite_readonly_url(settings.store_path, no_room=no_room)
            return Store.open(url, read_only=True, location=str(settings.store_path))
        return Store.open(sqlite_url(settings.store_path), location=str(settings.store_path))
    except StoreDamagedError as e:
        backups = backup.list_backups(settings.store_path)
        way = (
            f"`searchengine restore` puts back the newest backup ({backups[0].name}); `searchengine check` says more"
            if backups else "there is no backup to restore; re-index into another --data-dir"
        )
        raise StoreDamagedError(f"{e}. {way}") from e


def index_traces(settings: Settings) -> list[str]:
    """What in the data dir shows that an index was there (besides the store)."""
    traces = []
    for path in (settings.vectors_path, settings.ann_manifest_path):
        if path.exists():
            traces.append(path.name)
    for folder in (settings.backups_dir, settings.features_dir, settings.thumbnails_dir, settings.previews_dir):
        if folder.is_dir() and any(folder.iterdir()):
            traces.append(folder.name + "/")
    return traces


def store_exists(settings: Settings) -> bool:
    """Whether there is an index's store: the SQLite file, or an index's tables in the database."""
    if not settings.database_url:
        return settings.store_path.exists()
    from sqlalchemy import create_engine, inspect

    engine = create_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            return inspect(conn).has_table("meta")
    except Exception as e:  # noqa: BLE001 - a server that cannot be reached, in its own words
        said = str(getattr(e, "orig", None) or e).strip().splitlines()
        raise SearchEngineError(f"cannot reach the database {settings.store_location}: {said[0] if said else type(e).__name__}") from None
    finally:
        engine.dispose()


def check_store_present(settings: Settings) -> None:
    """StoreMissingError where the store is gone (or empty) but an index was there: a new empty
    store would silently lose every id, vector and caption, and reconciling would then wipe
    the derived files to match it. Never replace it: say what is missing and how to get it back."""
    if settings.database_url:
        return  # the database server keeps the store; an empty database is a new index
    store = settings.store_path
    missing = not store.exists() or store.stat().st_size == 0
    traces = index_traces(settings) if missing else []
    if not traces:
        return
    what = "is missing" if not store.exists() else "is empty (0 bytes)"
    backups = backup.list_backups(store)
    way = (
        f"`searchengine restore` puts back the newest backup ({backups[0].name}, of {len(backups)})"
        if backups else "there is no backup to restore; re-index into another --data-dir"
    )
    raise StoreMissingError(
        f"the store {store} {what}, but {settings.data_dir} holds an index ({', '.join(traces)}): {way}. "
        "Nothing was changed"
    )


class Library:
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
                return cls(settings, _open_store(settings, read_only=False), vectors=vectors)
            except OSError as e:
                if not (reader and e.errno == errno.ENOSPC and store_exists(settings)):
                    raise
                # A full disk: a reader still reads, read-only, changing nothing.
                log.warning("the disk holding %s is full; reading the index read-only", data_dir)
                return cls(settings, _open_store(settings, read_only=True, no_room=True), writable=False, vectors=vectors)
        if not store_exists(settings):
            # create=True but nothing may be written: there is no index to read either.
            raise ReadOnlyIndexError(
                f"no index in {data_dir}, and {blocked or data_dir} is not writable, so none can be made there"
            )
        return cls(settings, _open_store(settings, read_only=True), writable=False, vectors=vectors)

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
        store = _open_store(settings, read_only=unwritable_path(settings) is not None)
        try:
            return _recorded(store)
        finally:
            store.close()

    def built_with(self) -> Recorded:
        """What this index remembers of how it was built (see `recorded`)."""
        return _recorded(self.store)

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
        return links.inside_library(path, self.roots(), self.link_policy, real)

    def close(self) -> None:
        self._cancel.set()  # a rebuild in progress is dropped; the next start does it again
        if self._rebuild is not None:
            self._rebuild.join()
        self.store.close()
        self.thumbnails.close()
        self.previews.close()

    def bind(self, info: ModelInfo, former: Iterable[str] = ()) -> None:
        """Tie the library to a model (refused if it was built with another one). `former`:
        fingerprints earlier versions took of the same weights (`Store.bind_model`)."""
        self.store.bind_model(info, former)
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

    def _drop_derived_files(self) -> None:
        """The old model's vector index files (its feature cache: see `_feature_cache`)."""
        s = self.settings
        for f in [s.vectors_path, s.ann_manifest_path, *Path(s.data_dir).glob("ann-*.faiss")]:
            f.unlink(missing_ok=True)

    def _feature_cache(self, info: ModelInfo, stale: bool) -> FeatureCache | None:
        """The feature cache of the model in use. After a re-index's swap: the one it filled
        for the new model (`features.next`, once its tag names that model), moved into place
        by a writer and read where it is by a reader; else none (recomputed as needed)."""
        current, upcoming = self.settings.features_dir, self._next_features_dir()
        if not stale:
            return self._features_in(current, info)
        ready = _read_text(upcoming / MODEL_TAG) == info.fingerprint
        if not self.writable:
            return self._features_in(upcoming, info) if ready else None
        shutil.rmtree(current, ignore_errors=True)
        if ready:
            (upcoming / MODEL_TAG).unlink()
            os.replace(upcoming, current)
        else:
            shutil.rmtree(upcoming, ignore_errors=True)
        return self._features_in(current, info)

    def _features_in(self, folder: Path, info: ModelInfo) -> FeatureCache:
        """A feature cache in `folder`, writing the format the settings ask for."""
        return FeatureCache(folder, info.vit_shape, int8=self.settings.itm_features == "cache-int8")

    def _next_features_dir(self) -> Path:
        return Path(str(self.settings.features_dir) + ".next")

    # -- re-indexing with another model (searchengine/indexing/reindex.py runs it) ------------------------

    def begin_reindex(self, info: ModelInfo, keep_features: bool) -> int:
        """Start, or go on with, re-embedding every image with another model while this one
        keeps serving; returns how many images are done already. `keep_features`: fill a
        feature cache for the new model too."""
        self.require_writable("re-indexing writes to it")
        with self._write_lane:
            done = self.store.begin_reindex(info)
        if done == 0:
            shutil.rmtree(self._next_features_dir(), ignore_errors=True)
        self._next_features = self._features_in(self._next_features_dir(), info) if keep_features else None
        return done

    def reindex_todo(self, limit: int) -> list[tuple[int, str, list[str]]]:
        """Images not re-embedded yet: (id, sha256, paths)."""
        return self.store.reindex_todo(limit)

    def write_reindexed(self, ids: Sequence[int], vecs: np.ndarray, gone: Sequence[int] = (), vit: np.ndarray | None = None) -> None:
        """A batch of the re-index: new vectors (and ViT outputs, for the new feature cache);
        `gone`: images with no file left to embed, which leave the library at the swap."""
        if vit is not None and self._next_features is not None:
            for image_id, array in zip(ids, vit):  # before the vectors: an entry alone is harmless
                self._next_features.put(image_id, array)
        with self._write_lane:
            self.store.write_reindexed(ids, vecs, gone)

    def swap_in_reindex(self) -> tuple[ModelInfo, list[int]]:
        """The re-index takes over, atomically (one store transaction); then the vector
        index and feature cache follow the new model. Returns (the model, the ids that left)."""
        info = self.store.reindex_model()
        if info is not None and self._next_features is not None:
            self._next_features_dir().mkdir(parents=True, exist_ok=True)
            write_atomic(self._next_features_dir() / MODEL_TAG, lambda tmp: Path(tmp).write_text(info.fingerprint))
        with self._write_lane, self.lock:
            info, gone = self.store.swap_in_reindex()
            self.revision = self.store.revision()
            self._writes += 1
            self._attach(info)
        return info, gone

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

    # -- writes ---------------------------------------------------------------------------

    def require_writable(self, why: str = "it cannot be changed") -> None:
        """ReadOnlyIndexError where this library was opened read-only: naming the path that
        cannot be written where one is to blame, else saying `why` a write was asked for."""
        if not self.writable:
            Library.check_writable(self.settings)
            raise ReadOnlyIndexError(f"the index in {self.settings.data_dir} was opened read-only; {why}")

    def indexed_hashes(self, hashes: Iterable[str]) -> set[str]:
        """Which of these contents (sha256) the library has already: linked, never re-embedded."""
        return self.store.indexed_hashes(hashes)

    def store_hashes(self) -> list[str]:
        """Every content (sha256) the library has: what a distributed runner's workers are
        told, so that they decode only what is new."""
        return self.store.all_hashes()

    def mounted_roots(self) -> set[str]:
        """The library folders that were mount points when last scanned (`Indexer.absent`)."""
        return self.store.mounted_roots()

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
                new_images=[(n.sha256, n.meta, n.itc, [n.file]) for n in new], links=links, failures=failures
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

    # -- tiers ----------------------------------------------------------------------------

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

    # -- reads ----------------------------------------------------------------------------

    @property
    def thumbnail_format(self) -> tuple[int, int]:
        """(longest side in px, JPEG quality) of the thumbnails `write_batch` takes."""
        return self.thumbnails.size, self.thumbnails.quality

    @property
    def keeps_features(self) -> bool:
        """Whether `write_batch` stores the ViT output it is given (the feature cache)."""
        return self.features is not None

    def roots(self) -> list[str]:
        """The folders this library indexes."""
        return self.store.roots()

    def add_root(self, path: str) -> None:
        self.require_writable()
        with self._write_lane:
            self.store.add_root(path)

    def files_under(self, folder: str) -> dict[str, FileState]:
        """Every file the library has below `folder`: path -> size, mtime, status, image id."""
        return self.store.files_under(folder)

    def file_state(self, path: str) -> FileState | None:
        return self.store.file_state(path)

    # Queries: the vector index under its lock, the store's lookups, the caches.

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

    def image_count(self) -> int:
        """Images in the store (whether or not a vector index is loaded)."""
        return len(self.store.image_ids())

    def indexed_ids(self) -> np.ndarray:
        """Every image id in the vector index."""
        with self.lock:
            return self.index.ids()

    def counts(self) -> tuple[int, int]:
        """(images, vectors) in the vector index (0, 0 without one)."""
        with self.lock:
            return (len(self.index), self.index.ntotal) if self.index is not None else (0, 0)

    def filter_ids(self, filters) -> np.ndarray:
        """Ids of the images within a search's filters (folder, dates, camera, lens, type, orientation)."""
        return self.store.filter_ids(filters)

    def keyword_search(self, query: KeywordQuery, limit: int, filters) -> list[KeywordHit]:
        """Images whose caption or path words match, best first, within the filters."""
        return self.store.keyword_search(query, limit, filters)

    def facets(self, filters) -> dict[str, list[tuple[str, int]]]:
        """Image counts per camera, lens, file type and orientation (see `Store.facets`)."""
        return self.store.facets(filters)

    def keyword_matches(self, clauses: Sequence[Clause]) -> np.ndarray:
        """Ids of images whose caption or path words match any of these clauses."""
        return self.store.keyword_matches(clauses)

    def images(self, ids: Sequence[int]) -> dict[int, ImageRecord]:
        """What a hit shows of each image (paths, size, date, camera, caption), by id."""
        return self.store.images(ids)

    def image_detail(self, image_id: int) -> ImageDetail | None:
        """Everything the library knows of one image, with its files (None: no such image)."""
        d = self.store.image_detail(image_id)
        if d is None:
            return None
        return ImageDetail(
            d["id"], [IndexedFile(f["path"], f["size"], f["mtime_ns"]) for f in d["files"]], d["width"], d["height"],
            d["taken_at"], d["camera"], d["gps_lat"], d["gps_lon"], d["caption"], d["caption_model"], d["caption_error"],
            d["sha256"],
        )

    def cached_vit(self, image_id: int) -> np.ndarray | None:
        """The image's ViT output from the feature cache (fp16, or float32 from int8), if it has one."""
        return self.features.get(image_id) if self.features is not None and not self._foreign_features else None

    def cache_vit(self, ids: Sequence[int], arrays: np.ndarray) -> None:
        """Keep ViT outputs in the feature cache (fp16, or int8 with `cache-int8`), where the library has one."""
        if self.features is not None and not self._foreign_features:
            for image_id, array in zip(ids, arrays):
                self.features.put(image_id, array)

    def thumbnail(self, image_id: int, read: Callable[[], bytes]) -> bytes:
        """The image's thumbnail (JPEG), made from its original (`read`) if not kept yet."""
        return self.thumbnails.get(image_id, read)

    def preview(self, image_id: int, read: Callable[[], bytes]) -> bytes:
        """The image's screen-sized preview (JPEG), made from its original (`read`) if not kept yet."""
        return self.previews.get(image_id, read)

    def iter_vectors(self, ids: Iterable[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids [n], stored ITC vectors [n, Q, D]) in chunks, for images given by id."""
        return self.store.iter_vectors(ids)

    def vectors_of(self, image_id: int) -> np.ndarray | None:
        """An image's stored ITC vectors [Q, D] (None: no such image)."""
        stored = list(self.store.iter_vectors([image_id]))
        return stored[0][1][0] if stored else None

    def hashes_of(self, paths: Sequence[str]) -> dict[str, str]:
        """path -> sha256 of the content indexed under it (paths the library has)."""
        return self.store.hashes_of(paths)

    def images_to_caption(self, model: str, redo: bool = False) -> list[tuple[int, list[str]]]:
        """(image id, its paths) of the images without a caption from `model` (all: `redo`)."""
        return self.store.images_to_caption(model, redo=redo)

    def folders(self) -> list[FolderCount]:
        """Every folder with indexed images below it, subfolders included (see `Store.folders`)."""
        return self.store.folders()

    def folder_has_images(self, folder: str) -> bool:
        """Whether a folder filter (a path or a folder's name) matches any indexed file."""
        return self.store.folder_has_images(folder)

    def health(self) -> str | None:
        """None while the store is there and readable; else what is wrong and what to do (a
        serving process reports it at /healthz and answers 503 rather than 500s)."""
        path = self.settings.store_path
        if self.settings.database_url:
            try:
                self.store.revision()
                return None
            except Exception as e:  # noqa: BLE001
                return f"the database {self.settings.store_location} does not answer: {e}"
        if not path.exists() or path.stat().st_size == 0:
            what = "is missing" if not path.exists() else "is empty (0 bytes)"
        else:
            damage = self.store.problem()
            if damage is None:
                return None
            what = f"is damaged ({damage})"
        return f"the store {path} {what}: stop the server, then `searchengine check` and `searchengine restore`"

    # -- checking ---------------------------------------------------------------------------

    def check(self) -> list[tuple[bool, str]]:
        """(sound, what) of each part, read only: the store against itself, the vector index,
        the caches and the files against the store. Changes nothing; what is derived is
        repaired by the next command that opens the index for writing."""
        out: list[tuple[bool, str]] = []
        s = self.settings
        problem = None if s.database_url else backup.integrity_problem(s.store_path)
        sound = "sound (integrity check ok)" if not s.database_url else "answers (the server checks its own integrity)"
        out.append((problem is None, f"store {s.store_location}: " + (problem or sound)))
        if problem is not None:
            return out
        c = self.store.consistency()
        out.append((c["vectors"] == c["images"] and not c["bad_vectors"],
                    f"vectors in the store: {c['vectors']} for {c['images']} images" + (f", {c['bad_vectors']} of the wrong size" if c["bad_vectors"] else "")))
        out.append((c["text_rows"] == c["images"], f"full-text rows: {c['text_rows']} for {c['images']} images (rebuilt on open when they differ)"))
        out.append((c["images_without_file"] == 0, f"images with no file: {c['images_without_file']}"))
        store_ids = set(self.store.image_ids().tolist())
        info = self.store.model_info()
        if info is not None:
            try:
                index, _ = self._load_vector_index(info, verify=False)
                ids = set(index.ids().tolist()) if index is not None else None
            except Exception as e:  # noqa: BLE001 - a damaged derived file is reported, then rebuilt
                out.append((False, f"vector index {s.vectors_path}: unreadable ({e}); rebuilt from the store on open"))
            else:
                if ids is None:
                    out.append((not store_ids, f"vector index {s.vectors_path}: missing; rebuilt from the store on open"))
                else:
                    lacking, extra = len(store_ids - ids), len(ids - store_ids)
                    out.append((not lacking and not extra, f"vector index: {len(ids)} images; {lacking} to add and {extra} to drop on open"))
                    if isinstance(index, VectorIndex):
                        common = np.asarray(sorted(store_ids & ids), dtype=np.int64)
                        compared, differ = index.disagreement(self.store.iter_vectors(common))
                        out.append((differ == 0, f"vector index against the store: {compared} images' vectors compared, "
                                    + (f"{differ} differ (a file from another library?); rebuilt from the store on open" if differ else "all the same")))
        for name, cache in (("feature cache", self.features), ("thumbnails", self.thumbnails), ("previews", self.previews)):
            if cache is not None:
                stale = len(cache.ids() - store_ids)
                out.append((stale == 0, f"{name}: {stale} entries of images no longer indexed (dropped on open)"))
        gone = sum(1 for p in self.store.indexed_paths() if not os.path.exists(p))
        out.append((gone == 0, f"files on disk: {gone} indexed files not there now (`searchengine index` updates the index)"))
        if s.database_url:
            out.append((True, "backups: the database server's own (pg_dump)"))
            return out
        backups = self.backups()
        out.append((bool(backups) or s.backups == 0, f"backups: {len(backups)}" + (
            f", newest {backups[0].name}" if backups
            else "; `searchengine backup` makes one now (index and watch make them after a run that changed something)"
            if s.backups else "")))
        return out

    # -- backups --------------------------------------------------------------------------

    def backup(self) -> backup.Backup | None:
        """Back the store up now (None where backups are off or nothing may be written)."""
        if not self.writable or self.settings.backups == 0 or self.settings.database_url:
            return None  # a database server is backed up by its own tools (pg_dump)
        made = backup.make_backup(self.settings.store_path, self.store.revision(), self.settings.backups)
        self._last_backup = time.monotonic()
        log.info("backed up the store to %s (%d bytes)", made.path, made.size)
        return made

    def maybe_backup(self) -> backup.Backup | None:
        """A backup if the store changed since the last one and `backup_interval_s` has passed
        (the watcher's cadence: its updates come one by one, all day)."""
        if self.settings.database_url:
            return None
        newest = backup.list_backups(self.settings.store_path)
        if newest and newest[0].revision == self.store.revision():
            return None
        if time.monotonic() - self._last_backup < self.settings.backup_interval_s:
            return None
        return self.backup()

    def backups(self) -> list[backup.Backup]:
        return backup.list_backups(self.settings.store_path)

    # -- description ----------------------------------------------------------------------

    def describe(self, max_failures: int = 20) -> dict:
        """What `stats` shows: counts, failures by reason, model, index, sizes on disk, captions."""
        stats = self.store.stats(max_failures)
        model = stats.model
        return {
            "data_dir": str(self.settings.data_dir),
            "store": self.settings.store_location,
            "images": stats.images,
            "files": stats.files,
            "failed": stats.failed,
            "failures_by_reason": stats.failures_by_reason,
            "failures": [{"path": p, "reason": r, "error": e} for p, r, e in stats.failures],
            "roots": stats.roots,
            "model": model.name if model else None,
            "model_fingerprint": model.fingerprint if model else None,
            "model_dtype": model.dtype if model else None,  # the first run's; every run's: made_by
            # How the model ran that made the vectors ("bfloat16 on cpu"), one entry a way, first first.
            "made_by": self.store.made_by() if model else [],
            "index_type": self.index_type(),
            "vector_index": self.vector_index_info(),
            "links": self.link_policy,
            # Opened without the vector index (`stats`): what reconciling makes it hold.
            "vectors": self.index.ntotal if self.index else stats.images * (model.num_vectors if model else 0),
            "bytes_on_disk": self.sizes_on_disk(),
            "captioned": stats.captioned,
            "caption_models": stats.caption_models,
            "caption_failures": stats.caption_failures,
            "backups": [{"name": b.name, "taken": b.taken, "bytes": b.size} for b in self.backups()],
        }

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

    # -- sizes ----------------------------------------------------------------------------

    def sizes_on_disk(self) -> dict[str, int]:
        s = self.settings

        def size(p: Path) -> int:
            return p.stat().st_size if p.exists() else 0

        if s.database_url:
            store = self.store.size_bytes()
        else:
            store = sum(size(Path(str(s.store_path) + suffix)) for suffix in ("", "-wal", "-shm"))
        return {
            "store": store,
            "vector_index": size(s.vectors_path) + sum(size(p) for p in Path(s.data_dir).glob("ann-*.faiss")),
            # Counted from its folder: a reader that loads no vector index (`stats`) has no
            # FeatureCache object, and the cache is on disk all the same.
            "feature_cache": sum(p.stat().st_size for p in Path(s.features_dir).glob(f"*/*{FeatureCache.suffix}")),
            "thumbnails": self.thumbnails.size_bytes(),
            "previews": self.previews.size_bytes(),
            "backups": sum(b.size for b in self.backups()),
        }



def _recorded(store: Store) -> Recorded:
    return Recorded(store.model_info(), store.captioner(), tuple(store.roots()))


def model_info(model) -> ModelInfo:
    """What the store records about the model that makes its vectors."""
    return ModelInfo(
        name=model.name,
        fingerprint=model.fingerprint,
        num_vectors=model.num_query_tokens,
        dim=model.embed_dim,
        vit_shape=model.vit_shape,
        dtype=str(model.vision_dtype).replace("torch.", ""),
        device=model.device.split(":")[0],
    )
