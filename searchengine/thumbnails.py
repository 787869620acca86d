"""JPEG thumbnails and previews, kept in the data dir and deleted with their image.

- Thumbnails (the grid's tiles, 320 px): made at index time from the already decoded image,
  or on first request for images indexed without one.
- Previews (the detail view, 1600 px): made on first request, so a 16 MB original is read
  once rather than sent to the browser on every arrow key.

Transparent images are shown on a grey checkerboard (the usual sign of transparency), not on
the white the model sees them on: a white logo on white would be a blank tile.

A read-only data dir still serves the files it has; one it lacks is made in a spill folder
that belongs to this process (a temporary folder, removed on close).
"""

from __future__ import annotations

import io
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable

from PIL import Image

from searchengine.filecache import IdFileCache
from searchengine.imageio import decode_image

# Two mid greys: neither white nor black, so light and dark artwork both stay visible, and
# the dark page around a tile does not swallow it either.
CHECKER_LIGHT = (153, 153, 153)
CHECKER_DARK = (102, 102, 102)


class ThumbnailCache(IdFileCache):
    suffix = ".jpg"
    quality = 82

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
        """JPEG bytes of `image` (RGB, or RGBA: see `make_thumbnail`) at most `size` px a side."""
        return make_thumbnail(image, self.size, self.quality)

    def get(self, image_id: int, read: Callable[[], bytes]) -> Path:
        """The cached file, made from the original's bytes (`read`, which checks that they are
        still the indexed content) if it is not there yet."""
        path = self.path(image_id)
        if path.exists():
            return path
        writer = self._writer()
        path = writer.path(image_id)
        with self._locks[image_id % len(self._locks)]:
            if path.exists():
                return path
            image = decode_image(read(), max_pixels=self.max_pixels).display
            writer.put_bytes(image_id, self.make(image))
            return path


class _SpillFolder(IdFileCache):
    suffix = ThumbnailCache.suffix


class PreviewCache(ThumbnailCache):
    """Screen-sized JPEGs for the detail view; an image smaller than `size` is re-encoded."""

    quality = 85  # looked at full screen, unlike a tile

    def __init__(self, root: Path, size: int = 1600, max_pixels: int = 150_000_000, *, read_only: bool = False) -> None:
        super().__init__(root, size, max_pixels, read_only=read_only)


def make_thumbnail(image: Image.Image, size: int, quality: int = 82) -> bytes:
    """JPEG bytes, at most `size` px a side (never enlarged). An RGBA image is scaled first
    (Pillow scales RGBA with premultiplied alpha, so edges do not pick up the colour of
    transparent pixels) and then laid on a checkerboard whose squares stay the same size
    on screen whatever the original's size."""
    im = image.copy()
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    if im.mode == "RGBA":
        im = Image.alpha_composite(checkerboard(im.size, max(8, max(im.size) // 100)), im).convert("RGB")
    elif im.mode != "RGB":
        im = im.convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, optimize=True, progressive=True)
    return buf.getvalue()


def checkerboard(size: tuple[int, int], square: int = 8) -> Image.Image:
    """An opaque RGBA grey checkerboard of `size` with `square`-pixel squares."""
    w, h = size
    tile = Image.new("RGBA", (2 * square, 2 * square), CHECKER_LIGHT + (255,))
    dark = CHECKER_DARK + (255,)
    tile.paste(dark, (square, 0, 2 * square, square))
    tile.paste(dark, (0, square, square, 2 * square))
    board = Image.new("RGBA", (w, h))
    for y in range(0, h, 2 * square):
        for x in range(0, w, 2 * square):
            board.paste(tile, (x, y))
    return board
