"""On-disk cache of ViT outputs, the input ITM needs to re-rank without re-running the ViT.

One `.npy` per image id, deleted with its image, with a checksum after the array
(`filecache.sealed` with `TAG`). It is a cache: an entry that is missing,
unreadable or fails its checksum is recomputed from the image file, so it needs no fsync and
no reconciliation beyond dropping entries whose image is gone. A damaged entry was taken as it
was: random data under a valid header gave ITM nothing to score (`itm: null`), and the best
image fell from rank 1 to rank 18. An entry from before the checksum is checked by its values
(all finite) instead.

Two formats, told apart by their dtype and shape, so a cache written in one is read in the
other's mode too:
- fp16 [P, W] (`itm_features` cache, the CPU default): ITM within ~4e-4 of the reference;
- int8 [P, W + 4] (`cache-int8`): each token's W values scaled by its own largest magnitude
  to -127..127, the token's float32 scale in its last 4 bytes. Half the disk of fp16
  (blip2-itm-vit-g: 355 KiB an image against 707 KiB); the ITM difference it makes is
  measured in tests/vectors/test_feature_cache.py.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from searchengine.util.filecache import IdFileCache, sealed, unsealed

SCALE_BYTES = 4  # a float32 per token
TAG = b"SEFC\x01sum"  # then the digest: what ends an entry written with its checksum


def quantize(vit: np.ndarray) -> np.ndarray:
    """[P, W] floats -> [P, W + 4] int8: per-token symmetric 8-bit codes, then the scale."""
    x = np.asarray(vit, dtype=np.float32)
    scale = np.abs(x).max(axis=1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    codes = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
    return np.concatenate([codes, scale.astype(np.float32).view(np.int8)], axis=1)


def dequantize(packed: np.ndarray) -> np.ndarray:
    """[P, W + 4] int8 -> [P, W] float32."""
    packed = np.ascontiguousarray(packed)
    scale = packed[:, -SCALE_BYTES:].copy().view(np.float32)
    return packed[:, :-SCALE_BYTES].astype(np.float32) * scale


class FeatureCache(IdFileCache):
    suffix = ".npy"

    def __init__(self, root: Path, shape: tuple[int, int], *, int8: bool = False) -> None:
        super().__init__(root)
        self.shape = tuple(shape)
        self.int8 = int8

    def put(self, image_id: int, vit: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, quantize(vit) if self.int8 else np.ascontiguousarray(vit, dtype=np.float16))
        self.put_bytes(image_id, sealed(buf.getvalue(), TAG))

    def get(self, image_id: int) -> np.ndarray | None:
        """The entry as fp16 or, from an int8 one, float32; None if there is none, or if it is
        damaged (its checksum, or for an entry from before checksums its values, say so)."""
        try:
            raw = self.path(image_id).read_bytes()
        except OSError:
            return None
        opened = unsealed(raw, TAG)
        if opened is None:
            return None
        data, checked = opened
        try:
            arr = np.load(io.BytesIO(data))
        except (OSError, ValueError, EOFError):
            return None
        if arr.shape == self.shape and arr.dtype == np.float16:
            out = arr
        elif arr.dtype == np.int8 and arr.shape == (self.shape[0], self.shape[1] + SCALE_BYTES):
            out = dequantize(arr)
        else:
            return None
        return out if checked or np.isfinite(out).all() else None
