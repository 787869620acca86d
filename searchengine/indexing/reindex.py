"""Re-embedding a library with another model (`searchengine reindex --model DIR`), while the
old index goes on serving.

Every image is read again from a file that still has its content (its SHA-256 checks that),
decoded and embedded by the new model in batches; each batch's vectors go into the store's
re-index table (and its ViT outputs into the new model's feature cache), committed with the
batch, so an interrupted run goes on where it stopped. Nothing the old index reads changes
until the end: then one store transaction makes the new vectors and the new model current
(`Library.swap_in_reindex`), and the vector index and feature cache follow. A crash before
that transaction leaves the old index in use; after it, the next open rebuilds what the old
model left. Captions, dates, places and files are the images' own and stay as they are.
An image with no file left that holds its content cannot be embedded again: it leaves the
index at the swap (a later `index` run adds any file that comes back).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from searchengine.indexing.pipeline import map_ahead
from searchengine.indexing.scan import FileEntry
from searchengine.indexing.report import Report
from searchengine.indexing.stages import Decoded, EmbedStage, Read, ReadStage, decode_stage, index_batch_size
from searchengine.errors import SearchEngineError
from searchengine.library import Library, model_info
from searchengine.models.retrieval import RetrievalModel
from searchengine.config.settings import Settings

log = logging.getLogger(__name__)

GONE = "no file with this image's content is left to read"


@dataclass
class ReindexSummary:
    embedded: int = 0  # by this run
    resumed_from: int = 0  # images an interrupted run had done
    gone: int = 0  # images that left the index
    seconds: float = 0.0


class Reindexer:
    def __init__(
        self,
        model: RetrievalModel,
        library: Library,
        settings: Settings,
        *,
        report: Report = Report(),
    ) -> None:
        self.model = model
        self.library = library
        self.settings = settings
        self.report = report
        self.batch_size = index_batch_size(model, settings)
        self.read = ReadStage()
        self.decode = decode_stage(model, settings, library.thumbnail_format)
        self.keep_vit = settings.writes_feature_cache(model.device)
        self.embed = EmbedStage(model, keep_vit=self.keep_vit)

    def run(self) -> ReindexSummary:
        start = time.perf_counter()
        info = model_info(self.model)
        current = self.library.built_with().model
        if current is not None and current.fingerprint in {info.fingerprint, *self.model.former_fingerprints}:
            raise SearchEngineError(f"the index already uses this model ({info.name}, fingerprint {info.fingerprint}): nothing to do")
        if current is not None and (current.num_vectors, current.dim) != (info.num_vectors, info.dim):
            log.info("the new model's vectors are %dx%d (were %dx%d)", info.num_vectors, info.dim, current.num_vectors, current.dim)
        summary = ReindexSummary(resumed_from=self.library.begin_reindex(info, self.keep_vit))
        self.report.total(self.library.image_count())
        self.report.done(summary.resumed_from)
        while todo := self.library.reindex_todo(self.batch_size):
            decoded = list(map_ahead(self._load, todo, self.settings.decode_threads, 2 * self.batch_size))
            gone, ids, ready = [], [], []
            for (image_id, _, paths), d in zip(todo, decoded):
                if d is None:
                    gone.append(image_id)
                    self.report.skipped(paths[0] if paths else f"image {image_id}", GONE)
                else:
                    ids.append(image_id)
                    ready.append(d)
            embedded = self.embed(ready)
            vecs = np.stack([e.itc for e in embedded]) if embedded else np.zeros((0,), np.float32)
            vit = np.stack([e.vit for e in embedded]) if embedded and self.keep_vit else None
            self.library.write_reindexed(ids, vecs, gone, vit)
            summary.embedded += len(ids)
            summary.gone += len(gone)
            self.report.done(len(todo))
        _, left = self.library.swap_in_reindex()
        summary.gone = len(left)
        summary.seconds = time.perf_counter() - start
        return summary

    def _load(self, item: tuple[int, str, list[str]]) -> Decoded | None:
        """The image decoded from the first of its files that still holds its content."""
        _, sha256, paths = item
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                continue
            got = self.read(FileEntry(path, st.st_size, st.st_mtime_ns))
            if isinstance(got, Read) and got.sha256 == sha256:
                decoded = self.decode(got)
                if isinstance(decoded, Decoded):
                    return decoded
        return None
