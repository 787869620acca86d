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

from indexer.pipeline import map_ahead
from searchengine.captioner import Caption, Captioner
from searchengine.devices import defaults_for
from searchengine.errors import BadImageError, ReadOnlyIndexError
from searchengine.imageio import decode_image, read_file
from searchengine.library import Library
from searchengine.settings import Settings

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
        on_error: Callable[[str, str], None] | None = None,
        progress: Callable[[int], None] | None = None,
        on_total: Callable[[int], None] | None = None,
    ) -> None:
        self.captioner = captioner
        self.library = library
        self.settings = settings
        self.reader = reader
        self.on_error = on_error or (lambda path, message: None)
        self.progress = progress or (lambda n: None)
        self.on_total = on_total or (lambda n: None)
        if not library.writable:
            Library.check_writable(settings)  # names the path that cannot be written
            raise ReadOnlyIndexError(f"the index in {settings.data_dir} was opened read-only; captioning writes to it")
        self.batch_size = settings.batch_size or defaults_for(captioner.device).caption_batch

    def run(self, *, redo: bool = False) -> CaptionSummary:
        import torch

        start = time.perf_counter()
        summary = CaptionSummary()
        todo = self.library.images_to_caption(self.captioner.name, redo=redo)
        self.on_total(len(todo))
        batch: list[tuple[int, str, object]] = []
        rows: list[tuple[int, str | None, str, str | None]] = []

        def flush() -> None:
            if batch:
                captions = self.captioner.caption_pixels(torch.stack([px for _, _, px in batch]))
                for (image_id, path, _), c in zip(batch, captions):
                    self._record(rows, summary, image_id, path, c)
            self.library.set_captions(rows)
            self.progress(len(rows))
            batch.clear(), rows.clear()

        for image_id, paths, loaded in self._load_all(todo):
            if isinstance(loaded, Caption):  # no file could be read or prepared
                self._record(rows, summary, image_id, paths[0] if paths else f"image {image_id}", loaded)
            else:
                path, pixels = loaded
                batch.append((image_id, path, pixels))
            if len(batch) >= self.batch_size or len(rows) >= 256:
                flush()
        flush()
        summary.seconds = time.perf_counter() - start
        return summary

    def _record(self, rows, summary: CaptionSummary, image_id: int, path: str, c: Caption) -> None:
        rows.append((image_id, c.text, self.captioner.name, c.error))
        if c.text is None:
            summary.failed += 1
            self.on_error(path, c.error or "no caption")
        else:
            summary.captioned += 1

    def _load_all(self, todo: list[tuple[int, list[str]]]):
        """(image id, paths, loaded) in order, decoded a bounded window ahead in threads."""
        window = 2 * self.batch_size + self.settings.decode_workers
        loaded = map_ahead(lambda item: self._load(item[1]), todo, self.settings.decode_workers, window)
        for (image_id, paths), result in zip(todo, loaded):
            yield image_id, paths, result

    def _load(self, paths: list[str]):
        """(path, caption pixels) from the first file that decodes, else a failed Caption."""
        problems = []
        for path in paths:
            try:
                image = decode_image(self.reader(path), max_pixels=self.settings.max_image_pixels).image
                return path, self.captioner.preprocess([image])[0]
            except BadImageError as e:
                problems.append(str(e))
            except Exception as e:  # noqa: BLE001 - one file must not stop the run
                log.exception("unexpected error reading %s", path)
                problems.append(f"{type(e).__name__}: {e}")
        return Caption(None, "; ".join(problems) or "the image has no file")
