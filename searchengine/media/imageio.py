"""Image files: read, hash, decode once, apply EXIF orientation, convert to RGB.

Every way a file can be bad ends in `BadImageError(reason, message)` with a stable reason
code: empty, not_an_image, unsupported_format, too_large, truncated, decode_error, unreadable,
vanished.

HEIC/HEIF (iPhone photos) are read through pillow-heif and AVIF by Pillow itself (its wheels
carry libavif), both in the default install. Their files are listed whether or not the codec
is there at run time: a file whose codec is missing is skipped as `unsupported_format` with the
package to install, never silently left out.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from searchengine.errors import BadImageError

_BASE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp"}
# The file type facet: one name per format, whatever the extension's spelling. The CLI's
# --type, the API's `type` and the filters take their names from here.
FILE_TYPES = {
    "jpeg": (".jpg", ".jpeg", ".jpe"), "png": (".png",), "heic": (".heic", ".heif", ".hif"), "avif": (".avif",),
    "webp": (".webp",), "gif": (".gif",), "tiff": (".tif", ".tiff"), "bmp": (".bmp",),
}
_HEIF_EXTENSIONS = set(FILE_TYPES["heic"])
_AVIF_EXTENSIONS = set(FILE_TYPES["avif"])
# An image's shape as shown (after its EXIF rotation), for the orientation filter and facet;
# the store says what each means in SQL.
ORIENTATIONS = ("landscape", "portrait", "square")


def file_type(path: str) -> str | None:
    """The file type facet's name for a path (by its extension, any case)."""
    ext = os.path.splitext(path)[1].lower()
    return next((name for name, exts in FILE_TYPES.items() if ext in exts), None)

# ISO base media file brands (the `ftyp` box that opens the file) of the two formats.
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs"}
_AVIF_BRANDS = {b"avif", b"avis"}
_INSTALL_HINT = {
    "HEIC": "HEIC/HEIF photos need the pillow-heif package: pip install pillow-heif",
    "AVIF": "AVIF images need a Pillow built with AVIF (the PyPI wheels of Pillow 11.3 and later): pip install -U pillow",
}


@functools.cache
def _register_heif() -> None:
    """Register pillow-heif's opener with PIL, once per process (it is a dependency, but a
    broken or removed install degrades to `unsupported_format`, not to a crash)."""
    try:
        import pillow_heif
    except ImportError:
        return
    pillow_heif.register_heif_opener()


def image_extensions() -> set[str]:
    """File name extensions the scan lists, with or without their codec at run time."""
    return _BASE_EXTENSIONS | _HEIF_EXTENSIONS | _AVIF_EXTENSIONS


def _container_format(data: bytes) -> str | None:
    """'HEIC' or 'AVIF' when the bytes open with such an ISO media `ftyp` box, else None."""
    if data[4:8] != b"ftyp":
        return None
    size = int.from_bytes(data[:4], "big")
    # major brand, then (after the minor version) the compatible brands, 4 bytes each
    brands = [data[8:12]] + [data[i : i + 4] for i in range(16, min(size, len(data), 256), 4)]
    if any(b in _AVIF_BRANDS for b in brands):
        return "AVIF"
    if any(b in _HEIF_BRANDS for b in brands):
        return "HEIC"
    return None


def read_file(path: str) -> bytes:
    """The file's bytes, or BadImageError saying why they cannot be had."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise BadImageError("vanished", "file vanished before it could be read") from None
    except PermissionError:
        raise BadImageError("unreadable", "permission denied") from None
    except OSError as e:
        raise BadImageError("unreadable", f"cannot read file: {e.strerror or e}") from None


@dataclass
class ImageMeta:
    """What an image's file says about it (size, EXIF), and its caption once made."""

    width: int
    height: int
    taken_at: str | None = None
    camera: str | None = None
    lens: str | None = None  # EXIF LensModel
    gps_lat: float | None = None
    gps_lon: float | None = None
    caption: str | None = None
    caption_model: str | None = None
    caption_error: str | None = None


@dataclass
class Decoded:
    sha256: str
    image: Image.Image  # RGB, orientation applied, transparency on white: what the models see
    meta: ImageMeta
    # The same pixels with their transparency (RGBA), for images that have any: thumbnails
    # and previews show it on a checkerboard, where white would leave a blank tile.
    rgba: Image.Image | None = None

    @property
    def display(self) -> Image.Image:
        """What thumbnails and previews are made from (`thumbnails.make_thumbnail` takes either)."""
        return self.rgba if self.rgba is not None else self.image


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    sha256: str | None = None,
    limit_hint: str = "raise --max-pixels to allow it",
    draft: int | None = None,
) -> Decoded:
    """Decode once (see the module's docstring). `limit_hint`: what to do about an image over
    `max_pixels`, for the caller's audience (an indexing flag, or the API's upload limit).
    `draft`: a JPEG is decoded at the smallest DCT scale still at least this many pixels a
    side (a fraction of the memory and time of a full decode; the pixels then differ slightly
    from the reference processor's, see `settings.decode`). The metadata keeps the file's
    own width and height either way."""
    sha = sha256 or sha256_of(data)
    im = open_checked(data, max_pixels=max_pixels, limit_hint=limit_hint)
    w, h = im.size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if draft and im.format == "JPEG":
                im.draft("RGB", (draft, draft))
            im.load()
            exif = im.getexif()
            turned = exif.get(ORIENTATION_TAG) in (5, 6, 7, 8)  # shown a quarter turn from how it is stored
            im = ImageOps.exif_transpose(im)
            rgb, rgba = _to_rgb_keeping_alpha(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as e:
        raise _decode_failure("cannot decode image", e) from None
    meta = meta_of(rgb.size, exif)
    if rgb.size != (w, h) and rgb.size != (h, w):  # decoded at a reduced scale: the file's own size
        meta.width, meta.height = (h, w) if turned else (w, h)
    return Decoded(sha, rgb, meta, rgba)


def open_checked(data: bytes, *, max_pixels: int, limit_hint: str = "raise --max-pixels to allow it") -> Image.Image:
    """The image's header, opened (no pixel decoded yet) and checked: not empty, an image of a
    format this install reads, at most `max_pixels`, with pixels. BadImageError otherwise."""
    if not data:
        raise BadImageError("empty", "file is empty (0 bytes)")
    _register_heif()
    # Our limit (each caller's own) is checked from the header before any pixel is decoded.
    # PIL's process-wide guard stays on as a second line; it is only ever raised, never
    # lowered, so one caller's small limit (uploads) never leaks into another's decodes.
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)):,} pixels" if found else "its size"
        raise BadImageError("too_large", _too_large(size, max_pixels, limit_hint)) from None
    except UnidentifiedImageError:
        container = _container_format(data)
        if container is not None:  # an image, but no codec for it here
            raise BadImageError("unsupported_format", f"cannot read {container}: {_INSTALL_HINT[container]}") from None
        raise BadImageError("not_an_image", "not an image (no known image format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _decode_failure("cannot open image", e) from None
    w, h = im.size
    if w * h > max_pixels:
        raise BadImageError("too_large", _too_large(f"{w}x{h} = {w * h:,} pixels", max_pixels, limit_hint))
    if w == 0 or h == 0:
        raise BadImageError("decode_error", f"image has no pixels ({w}x{h})")
    return im


def _decode_failure(what: str, e: BaseException) -> BadImageError:
    """`truncated` when PIL ran out of bytes, else `decode_error`.

    PIL says so in several ways, depending on where the file ends: "image file is truncated"
    (in the pixel data), "Truncated File Read" (in a header segment such as EXIF or an ICC
    profile, while opening), "truncated PNG file", or an EOFError.
    """
    msg = str(e) or type(e).__name__
    if isinstance(e, EOFError) or "truncated" in msg.lower():
        return BadImageError("truncated", f"file is truncated ({what}: {msg})")
    return BadImageError("decode_error", f"{what}: {msg}")


def _too_large(size: str, max_pixels: int, hint: str) -> str:
    return f"image is {size}, over the limit of {max_pixels:,} (a decompression-bomb guard; {hint})"


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB. Transparency is composited on white (as transformers' convert_to_rgb does);
    16- and 32-bit greyscale is scaled down rather than clipped to white."""
    return _to_rgb_keeping_alpha(im)[0]


def _to_rgb_keeping_alpha(im: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """(`to_rgb(im)`, the RGBA image it was composited from, or None if `im` has no alpha):
    one conversion serves the model's pixels and the thumbnail's."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        im = Image.fromarray(np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")
    has_alpha = "A" in im.getbands() or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), rgba
    return (im if im.mode == "RGB" else im.convert("RGB")), None


_EXIF_IFD = 0x8769
ORIENTATION_TAG = 0x0112
_GPS_IFD = 0x8825
_TAGS = {v: k for k, v in ExifTags.TAGS.items()}


def meta_of(size: tuple[int, int], exif: Image.Exif) -> ImageMeta:
    """An image's metadata from its (width, height) as shown and its EXIF."""
    meta = ImageMeta(width=size[0], height=size[1])
    try:
        sub = exif.get_ifd(_EXIF_IFD)
        raw = sub.get(_TAGS["DateTimeOriginal"]) or exif.get(_TAGS["DateTime"])
        if raw:
            meta.taken_at = datetime.strptime(str(raw).strip("\x00 ")[:19], "%Y:%m:%d %H:%M:%S").isoformat()
    except (ValueError, KeyError, TypeError):
        pass
    make = str(exif.get(_TAGS["Make"], "") or "").strip("\x00 ")
    model = str(exif.get(_TAGS["Model"], "") or "").strip("\x00 ")
    if model:
        meta.camera = model if make and model.lower().startswith(make.lower().split()[0]) else f"{make} {model}".strip()
    elif make:
        meta.camera = make
    try:
        lens = str(exif.get_ifd(_EXIF_IFD).get(_TAGS["LensModel"], "") or "").strip("\x00 ")
        meta.lens = lens[:200] or None
    except (ValueError, KeyError, TypeError):
        pass
    try:
        gps = exif.get_ifd(_GPS_IFD)
        if 2 in gps and 4 in gps:
            meta.gps_lat = _degrees(gps[2]) * (-1 if str(gps.get(1, "N")).upper().startswith("S") else 1)
            meta.gps_lon = _degrees(gps[4]) * (-1 if str(gps.get(3, "E")).upper().startswith("W") else 1)
    except (ValueError, TypeError, ZeroDivisionError, KeyError, IndexError):
        meta.gps_lat = meta.gps_lon = None
    return meta


def _degrees(dms) -> float:
    d, m, s = (float(x) for x in dms)
    return round(d + m / 60 + s / 3600, 7)
