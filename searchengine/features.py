"""On-disk cache of ViT outputs (fp16), the input ITM needs to re-rank without re-running the ViT.

One `.npy` file per image id, in 256 sub-folders: written by rename (a reader sees a whole file
or none), read memory-mapped, deleted with its image. It is a cache: an entry that is missing
or unreadable is recomputed from the image file, so it needs no fsync and no reconciliation
beyond dropping entries whose image is gone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np


class FeatureCache:
    def __init__(self, root: Path, shape: tuple[int, int]) -> None:
        self.root = Path(root)
        self.shape = tuple(shape)

    def _path(self, image_id: int) -> Path:
        return self.root / f"{image_id % 256:02x}" / f"{image_id}.npy"

    def put(self, image_id: int, vit: np.ndarray) -> None:
        path = self._path(image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(vit, dtype=np.float16))
        os.replace(tmp, path)

    def get(self, image_id: int) -> np.ndarray | None:
        try:
            arr = np.load(self._path(image_id), mmap_mode="r")
        except (OSError, ValueError):
            return None
        return arr if arr.shape == self.shape and arr.dtype == np.float16 else None

    def delete(self, ids: Iterable[int]) -> None:
        for image_id in ids:
            self._path(int(image_id)).unlink(missing_ok=True)

    def ids(self) -> set[int]:
        out: set[int] = set()
        if not self.root.is_dir():
            return out
        for sub in self.root.iterdir():
            if sub.is_dir():
                out.update(int(p.stem) for p in sub.glob("*.npy") if p.stem.isdigit())
        return out

    def size_bytes(self) -> int:
        if not self.root.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.root.glob("*/*.npy"))
