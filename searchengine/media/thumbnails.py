"""JPEG thumbnails and previews, kept in the data dir and deleted with their image.

- Thumbnails (the grid's tiles, 320 px): made at index time from the already decoded image,
  or on first request for images indexed without one.
- Previews (the detail view, 1600 px): made on first request, so a 16 MB original is read
  once rather than sent to the browser on every arrow key.

Transparent images are shown on a grey checkerboard (the usual sign of transparency), not on
the white the model sees them on: a white logo on white would be a blank tile.

A read-only data dir still serves the files it has; one it lacks is made in a spill folder
that belongs to this process (a temporary folder, removed on close).

Each file is the JPEG and then a checksum (`filecache.sealed` with `TAG`): a file that
fails it (random bytes, 0 bytes, cut short) is made again from the original, never served. A
file from before the checksum is served if it is a whole JPEG (starts with SOI, ends with
EOI). A cache that cannot be written (a full disk, `thumbnails/` replaced by a file) still
serves what it makes; a file standing where the folder should be is moved aside.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable

from PIL import Image

from searchengine.util.filecache import IdFileCache, sealed, unsealed
from searchengine.media.imageio import decode_image

log = logging.getLogger(__name__)

TAG = b"SETN\x01sum"  # then the digest: what ends a cached JPEG written with its checksum


def checked_jpeg(raw: bytes) -> bytes | None:
    """The JPEG in a cached file, or None when the file is damaged: its checksum fails or,
    from before checksums, it is no whole JPEG (SOI ... EOI)."""
    opened = unsealed(raw, TAG)
    if opened is None:
        return None
    jpeg, checked = opened
    return jpeg if checked or (jpeg.startswith(b"\xff\xd8\xff") and jpeg.endswith(b"\xff\xd9")) else None


# Two mid greys: neither white nor black, so light and dark artwork both stay visible, and
# the dark page around a tile does not swallow it either.
CHECKER_LIGHT = (153, 153, 153)
CHECKER_DARK = (102, 102, 102)


def thumbnail_format(settings) -> tuple[int, int]:
    """(longest side in px, JPEG quality) of the thumbnails a library made with `settings`
    keeps; `Library.thumbnail_format` is that of an open one."""
    return settings.thumbnail_size, ThumbnailCache.quality


class ThumbnailCache(IdFileCache):
    suffix = ".jpg"
    quality = 82
    what = "thumbnail"  # in messages

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

    def put(self, image_id: int, jpeg: bytes) -> bool:
        """Keep `jpeg` with its checksum; False (logged) when the cache cannot be written,
        which costs only the making of it again on its first request."""
        data = sealed(jpeg, TAG)
        try:
            try:
                self._writer().put_bytes(image_id, data)
            except OSError:
                if not self._move_aside_a_file_in_the_way():
                    raise
                self._writer().put_bytes(image_id, data)
        except OSError as e:
            log.warning("%s: cannot keep the %s of image %d (%s); it is made again when asked for",
                        self.root, self.what, image_id, e.strerror or e)
            return False
        return True

    def cached(self, image_id: int) -> bytes | None:
        """The kept JPEG, or None: not there, unreadable, or damaged (then it is made again)."""
        for cache in (self, self._spill):
            if cache is None:
                continue
            path = cache.path(image_id)
            try:
                raw = path.read_bytes()
            except OSError:
                continue
            jpeg = checked_jpeg(raw)
            if jpeg is not None:
                return jpeg
            log.warning("%s: the %s of image %d is damaged (%d bytes that fail their checksum); made again",
                        path, self.what, image_id, len(raw))
        return None

    def get(self, image_id: int, read: Callable[[], bytes]) -> bytes:
        """The JPEG, made from the original's bytes (`read`, which checks that they are still
        the indexed content) if none is kept, or the one kept is damaged."""
        jpeg = self.cached(image_id)
        if jpeg is not None:
            return jpeg
        with self._locks[image_id % len(self._locks)]:
            jpeg = self.cached(image_id)
            if jpeg is not None:
                return jpeg
            jpeg = self.make(decode_image(read(), max_pixels=self.max_pixels).display)
            self.put(image_id, jpeg)
            return jpeg

    def _move_aside_a_file_in_the_way(self) -> bool:
        """A file where the cache's folder (or one of its 256 sub-folders) should be is moved
        aside, once, so the cache works again. Whether anything was moved."""
        if self.read_only:
            return False
        moved = False
        folders = [self.root] + ([self.root / f"{i:02x}" for i in range(256)] if self.root.is_dir() else [])
        for path in folders:
            if os.path.lexists(path) and not path.is_dir():
                aside = path.with_name(path.name + ".not-a-folder")
                try:
                    os.replace(path, aside)
                except OSError:
                    continue
                log.warning("%s was a file, not the %s folder: moved aside to %s", path, self.what, aside)
                moved = True
        return moved


class _SpillFolder(IdFileCache):
    suffix = ThumbnailCache.suffix


class PreviewCache(ThumbnailCache):
    """Screen-sized JPEGs for the detail view; an image smaller than `size` is re-encoded."""

    quality = 85  # looked at full screen, unlike a tile
    what = "preview"

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
