"""Small JPEG thumbnails, made once per image on first request and kept in the data dir."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Sequence

from PIL import Image

from searchengine.errors import BadImageError
from searchengine.imageio import decode_image, read_file


class ThumbnailCache:
    def __init__(self, root: Path, size: int = 320, max_pixels: int = 150_000_000) -> None:
        self.root = Path(root)
        self.size = size
        self.max_pixels = max_pixels
        self._locks = [threading.Lock() for _ in range(64)]  # one maker per image at a time

    def path(self, image_id: int) -> Path:
        return self.root / f"{image_id % 256:02x}" / f"{image_id}.jpg"

    def get(self, image_id: int, sources: Sequence[str]) -> Path:
        """The thumbnail file, made from the first readable source if it is not there yet."""
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
            data = make_thumbnail(image, self.size)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            return path

    def delete(self, ids) -> None:
        for image_id in ids:
            self.path(int(image_id)).unlink(missing_ok=True)


def make_thumbnail(image: Image.Image, size: int) -> bytes:
    im = image.copy()
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=82, optimize=True, progressive=True)
    return buf.getvalue()
