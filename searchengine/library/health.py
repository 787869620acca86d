"""What the library says about itself: health (for /healthz), `check`, backups, and what
`stats` shows."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from searchengine.store import backup
from searchengine.vectors.exact import VectorIndex
from searchengine.vectors.feature_cache import FeatureCache

log = logging.getLogger(__name__)


class Health:
    """The Library's checks, backups and description: one part of `Library` (searchengine.library.core)."""

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
