"""Re-embedding every image with another model while the old one serves (searchengine.indexing
.reindex runs it), and the ViT feature cache that follows the model in use."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from searchengine.library.records import MODEL_TAG, read_text
from searchengine.store.records import ModelInfo
from searchengine.vectors.exact import write_atomic
from searchengine.vectors.feature_cache import FeatureCache


class Reindexing:
    """The Library's re-index and feature cache: one part of `Library` (searchengine.library.core)."""

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
        ready = read_text(upcoming / MODEL_TAG) == info.fingerprint
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

    def cached_vit(self, image_id: int) -> np.ndarray | None:
        """The image's ViT output from the feature cache (fp16, or float32 from int8), if it has one."""
        return self.features.get(image_id) if self.features is not None and not self._foreign_features else None

    def cache_vit(self, ids: Sequence[int], arrays: np.ndarray) -> None:
        """Keep ViT outputs in the feature cache (fp16, or int8 with `cache-int8`), where the library has one."""
        if self.features is not None and not self._foreign_features:
            for image_id, array in zip(ids, arrays):
                self.features.put(image_id, array)
