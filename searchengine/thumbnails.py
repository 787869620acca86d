"""JPEG thumbnails and previews, kept in the data dir and deleted with their image.

- Thumbnails (the grid's tiles, 320 px): made at index time from the already decoded image,
  or on first request for images indexed without one.
- Previews (the detail view, 1600 px): made on first request, so a 16 MB original is read
  once rather than sent to the browser on every arrow key.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Sequence

from PIL import Image

from searchengine.errors import BadImageError
from searchengine.filecache import IdFileCache
from searchengine.imageio import decode_image, read_file


class ThumbnailCache(IdFileCache):
    suffix = ".jpg"
    quality = 82

    def __init__(self, root: Path, size: int = 320, max_pixels: int = 150_000_000) -> None:
        super().__init__(root)
        self.size = size
        self.max_pixels = max_pixels
        self._locks = [threading.Lock() for _ in range(64)]  # one maker per image at a time

    def make(self, image: Image.Image) -> bytes:
        """JPEG bytes of `image` at most `size` px a side."""
        return make_thumbnail(image, self.size, self.quality)

    def get(self, image_id: int, sources: Sequence[str]) -> Path:
        """The cached file, made from the first readable source if it is not there yet."""
        path = self.path(image_id)
        if path.exists():
            return path
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
            self.put_bytes(image_id, self.make(image))
            return path


class PreviewCache(ThumbnailCache):
    """Screen-sized JPEGs for the detail view; an image smaller than `size` is re-encoded."""

    quality = 85  # looked at full screen, unlike a tile

    def __init__(self, root: Path, size: int = 1600, max_pixels: int = 150_000_000) -> None:
        super().__init__(root, size, max_pixels)


def make_thumbnail(image: Image.Image, size: int, quality: int = 82) -> bytes:
    """JPEG bytes, at most `size` px a side (never enlarged)."""
    im = image.copy()
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, optimize=True, progressive=True)
    return buf.getvalue()
