"""Captioning an existing index (`searchengine caption`): no re-embedding, no ViT.

Picks the images that have no caption from the captioner's model (or whose captioning failed;
all of them with `redo`), reads and decodes each from its first readable file, a bounded
window ahead in a thread pool, captions them in batches and stores each batch in one
transaction (caption, model, error, and the full-text row). An interrupted run keeps the
batches it stored; running it again does the rest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from searchengine.indexing.batches import batched
from searchengine.indexing.pipeline import map_ahead
from searchengine.indexing.report import Report
from searchengine.indexing.stages import CaptionDecodeStage, caption_batch
from searchengine.models.captioner import Captioner
from searchengine.config.devices import defaults_for
from searchengine.media.imageio import read_file
from searchengine.library import Library
from searchengine.config.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class CaptionSummary:
    captioned: int = 0
    failed: int = 0
    seconds: float = 0.0


class Recaptioner:
    def __init__(
        self,
        captioner: Captioner,
        library: Library,
        settings: Settings,
        *,
        reader: Callable[[str], bytes] = read_file,
        report: Report = Report(),
    ) -> None:
        self.captioner = captioner
        self.library = library
        self.settings = settings
        self.reader = reader
        self.report = report
        library.require_writable("captioning writes to it")
        self.batch_size = settings.batch_size or defaults_for(captioner.device).caption_batch

    def run(self, *, redo: bool = False) -> CaptionSummary:
        """The indexer's runner shape with a caption-only mapper: decode in threads
        (`CaptionDecodeStage`), caption in batches (`caption_batch`), write each batch
        through the Library."""
        start = time.perf_counter()
        summary = CaptionSummary()
        todo = self.library.catalog.images_to_caption(self.captioner.name, redo=redo)
        self.report.total(len(todo))
        decode = CaptionDecodeStage(self.captioner.preprocessor, self.settings.max_image_pixels, self.reader)
        window = 2 * self.batch_size + self.settings.decode_threads
        # A batch is `batch_size` images for the captioner; those without pixels ride along.
        decoded = map_ahead(decode, todo, self.settings.decode_threads, window)
        for batch in batched(decoded, self.batch_size, counts=lambda item: item.pixels is not None):
            captions = caption_batch(self.captioner, [b.pixels for b in batch], [b.error for b in batch])
            rows = []
            for item, c in zip(batch, captions):
                rows.append((item.image_id, c.text, self.captioner.name, c.error))
                if c.text is None:
                    summary.failed += 1
                    self.report.caption_failed(item.path, c.error or "no caption")
                else:
                    summary.captioned += 1
            self.library.set_captions(rows)
            self.report.done(len(rows))
        summary.seconds = time.perf_counter() - start
        return summary
