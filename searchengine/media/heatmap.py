"""A patch-grid heat map drawn over a photo: the map scaled smoothly to the photo's size,
coloured from transparent (no part in the match) through red to yellow (the peak), as a PNG.

The retrieval model sees the whole photo squeezed to a square (its processor resizes without
cropping), so the grid stretches over the whole photo, whatever its shape.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

OPACITY = 0.6  # at the peak


def colour(grid: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """RGBA [H, W] of the map at `size` (width, height)."""
    g = np.clip(np.asarray(grid, np.float32), 0.0, 1.0)
    heat = np.asarray(Image.fromarray((g * 255).astype(np.uint8), "L").resize(size, Image.Resampling.BILINEAR), np.float32) / 255
    rgba = np.empty((*heat.shape, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 1] = (np.clip(heat * 2 - 1, 0, 1) * 230).astype(np.uint8)  # red, then yellow in the upper half
    rgba[..., 2] = 0
    rgba[..., 3] = (heat * OPACITY * 255).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA")


def overlay(photo: Image.Image, grid: np.ndarray) -> bytes:
    """The photo with the map over it, as PNG bytes, at the photo's size."""
    base = photo.convert("RGBA")
    base.alpha_composite(colour(grid, base.size))
    out = io.BytesIO()
    base.convert("RGB").save(out, "PNG", optimize=False)
    return out.getvalue()
