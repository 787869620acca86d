"""Generated test images: awkward but valid ones, and bad ones."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def gradient(w: int = 96, h: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], -1).astype(np.uint8)


def save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_16bit_grey(arr8: np.ndarray) -> bytes:
    return save(Image.fromarray(arr8.astype(np.uint16) * 257), "PNG")


def exif_rotated_jpeg(arr: np.ndarray, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


def write_awkward(folder: Path) -> dict[str, Path]:
    """CMYK JPEG, 16-bit PNG, palette GIF, WebP with alpha, EXIF-rotated JPEG, non-ASCII name."""
    folder.mkdir(parents=True, exist_ok=True)
    g = gradient()
    files = {
        "cmyk": ("cmyk.jpg", save(Image.fromarray(g).convert("CMYK"), "JPEG", quality=95)),
        "png16": ("grey16.png", png_16bit_grey(g[..., 0])),
        "gif": ("palette.gif", save(Image.fromarray(g).convert("P", palette=Image.Palette.ADAPTIVE), "GIF")),
        "webp_alpha": ("alpha.webp", save(Image.fromarray(np.dstack([g, np.full(g.shape[:2], 128, np.uint8)]), "RGBA"), "WEBP", lossless=True)),
        "rotated": ("rotated.jpg", exif_rotated_jpeg(g)),
        "unicode": ("fête à Zürich 東京.png", save(Image.fromarray(g[::-1].copy()), "PNG")),
        "bmp": ("plain.bmp", save(Image.fromarray(g[:, ::-1].copy()), "BMP")),
        "tiff": ("plain.tiff", save(Image.fromarray(255 - g), "TIFF")),
    }
    out = {}
    for key, (name, data) in files.items():
        (folder / name).write_bytes(data)
        out[key] = folder / name
    return out


def write_bad(folder: Path, a_real_jpeg: bytes) -> dict[str, Path]:
    """Zero-byte, truncated JPEG, a text file named .jpg, a decompression bomb."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "empty": ("empty.jpg", b""),
        "truncated": ("truncated.jpg", a_real_jpeg[: len(a_real_jpeg) // 3]),
        "not_an_image": ("notes.jpg", b"shopping list: milk, eggs\n" * 20),
        "too_large": ("bomb.png", bomb_png()),
    }
    out = {}
    for reason, (name, data) in files.items():
        (folder / name).write_bytes(data)
        out[reason] = folder / name
    return out
