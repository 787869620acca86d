"""Small JPEG thumbnails: made at index time from the already decoded image, or on first
request for images indexed without one; kept in the data dir, deleted with their image.

A read-only data dir still serves the thumbnails it has; one it lacks is made in a spill
folder that belongs to this process (a temporary folder, removed on close)."""

from __future__ import annotations

import io
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Sequence

from PIL import Image

from searchengine.errors import BadImageError
from searchengine.filecache import IdFileCache
from searchengine.imageio import decode_image, read_file


class ThumbnailCache(IdFileCache):
    suffix = ".jpg"

    def __init__(self, root: Path, size: int = 320, max_pixels: int = 150_000_000, *, read_only: bool = False) -> None:
        super().__init__(root)
        self.size = size
        self.max_pixels = max_pixels
        self.read_only = read_only
        self._locks = [threading.Lock() for _ in range(64)]  # one maker per image at a time
        self._spill: _SpillFolder | None = None
        self._spill_lock = threading.Lock()

    def close(self) -> None:
        """Remove the spill folder, if any (it holds nothing another process could use)."""
        if self._spill is not None:
            shutil.rmtree(self._spill.root, ignore_errors=True)
            self._spill = None

    def _writer(self) -> IdFileCache:
        if not self.read_only:
            return self
        with self._spill_lock:
            if self._spill is None:
                self._spill = _SpillFolder(Path(tempfile.mkdtemp(prefix="searchengine-thumbnails-")))
            return self._spill

    def make(self, image: Image.Image) -> bytes:
        return make_thumbnail(image, self.size)

    def get(self, image_id: int, sources: Sequence[str]) -> Path:
        """The thumbnail file, made from the first readable source if it is not there yet."""
        path = self.path(image_id)
        if path.exists():
            return path
        writer = self._writer()
        path = writer.path(image_id)
        with self._locks[image_id % len(self._locks)]:
            if path.exists():
                return path
            error: BadImageError | None = None
            for source in sources:
                try:
                    image = decode_image(read_file(source), max_pixels=self.max_pixels).image
                    break
                except BadImageError as e:
                    error = e
            else:
                raise error or BadImageError("vanished", "the image has no file")
            writer.put_bytes(image_id, self.make(image))
            return path


class _SpillFolder(IdFileCache):
    suffix = ThumbnailCache.suffix


def make_thumbnail(image: Image.Image, size: int) -> bytes:
    im = image.copy()
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=82, optimize=True, progressive=True)
    return buf.getvalue()
