"""On-disk cache of ViT outputs (fp16), the input ITM needs to re-rank without re-running the ViT.

One `.npy` per image id, read memory-mapped, deleted with its image. It is a cache: an entry
that is missing or unreadable is recomputed from the image file, so it needs no fsync and no
reconciliation beyond dropping entries whose image is gone.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from searchengine.filecache import IdFileCache


class FeatureCache(IdFileCache):
    suffix = ".npy"

    def __init__(self, root: Path, shape: tuple[int, int]) -> None:
        super().__init__(root)
        self.shape = tuple(shape)

    def put(self, image_id: int, vit: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(vit, dtype=np.float16))
        self.put_bytes(image_id, buf.getvalue())

    def get(self, image_id: int) -> np.ndarray | None:
        try:
            arr = np.load(self.path(image_id), mmap_mode="r")
        except (OSError, ValueError):
            return None
        return arr if arr.shape == self.shape and arr.dtype == np.float16 else None
