"""Decoding on the model's device (`decode = "device"`): a JPEG is decoded by nvJPEG on a CUDA
GPU (`torchvision.io.decode_jpeg(device=...)`), and everything after the decode (EXIF
orientation, the resize to each model's input, rescaling, normalising, the thumbnail's resize)
is tensor ops on that device, so the CPU only parses the header and encodes the small
thumbnail. On a CPU the same tensor ops run on PIL's reduced-scale decode (that is what the
tests exercise; only the nvJPEG call itself needs a GPU).

Only plain JPEGs take this path: 8-bit YCbCr or greyscale. Anything else (PNG, HEIC, CMYK
JPEGs, a JPEG the GPU decoder refuses) returns None and goes through `imageio.decode_image`,
so every awkward-file rule there still holds. The pixel guard is `imageio.open_checked`'s,
read from the header before any pixel is decoded.

The resize is PyTorch's antialiased bicubic, which uses PIL's kernel (a = -0.5) over PIL's
support, then rounded to 8 bits as PIL's is: the pixels differ from the reference
processor's by rounding, and the ITC vectors by cosine >= 0.9999 (benchmarks/feed_rate.py
--parity, tests/media/test_device_decode.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from searchengine.errors import SearchEngineError
from searchengine.media.imageio import ORIENTATION_TAG, ImageMeta, meta_of, open_checked

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from searchengine.media.preprocess import Preprocessor


@dataclass(frozen=True)
class OnDevice:
    """A decoded JPEG as a uint8 tensor [3, H, W] on the device, orientation applied."""

    pixels: "torch.Tensor"
    meta: ImageMeta


def orient(t: "torch.Tensor", orientation: int | None) -> "torch.Tensor":
    """[C, H, W] turned as EXIF `orientation` says (what PIL's `ImageOps.exif_transpose` does)."""
    if orientation == 2:
        return t.flip(2)
    if orientation == 3:
        return t.flip(1).flip(2)
    if orientation == 4:
        return t.flip(1)
    if orientation == 5:
        return t.transpose(1, 2)
    if orientation == 6:
        return t.rot90(-1, (1, 2))
    if orientation == 7:
        return t.transpose(1, 2).flip(1).flip(2)
    if orientation == 8:
        return t.rot90(1, (1, 2))
    return t


def resize(t: "torch.Tensor", size: tuple[int, int]) -> "torch.Tensor":
    """uint8 [3, H, W] -> float [3, h, w] of 8-bit values, `size` = (w, h): PIL's bicubic."""
    import torch
    from torch.nn import functional as F

    w, h = size
    if t.shape[1:] == (h, w):
        return t.float()
    x = F.interpolate(t[None].float(), size=(h, w), mode="bicubic", antialias=True, align_corners=False)[0]
    return torch.round(x.clamp_(0, 255))


def tensor_ready(preprocess: "Preprocessor") -> bool:
    """Whether `model_input` can make this processor's input: it resizes to a fixed size, then
    rescales and normalises, and does nothing else (no crop, no padding)."""
    p = preprocess.image_processor
    return preprocess.target() is not None and not getattr(p, "do_center_crop", False) and not getattr(p, "do_pad", False)


def model_input(t: "torch.Tensor", preprocess: "Preprocessor") -> "torch.Tensor":
    """uint8 [3, H, W] -> the model's pixel values [3, S, S], as `preprocess` makes them from a
    PIL image (for a processor that is `tensor_ready`)."""
    import torch

    p = preprocess.image_processor
    x = resize(t, preprocess.target())
    if getattr(p, "do_rescale", True):
        x = x * float(getattr(p, "rescale_factor", 1 / 255))
    if getattr(p, "do_normalize", True):
        mean = torch.tensor(p.image_mean, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.tensor(p.image_std, dtype=x.dtype, device=x.device)[:, None, None]
        x = (x - mean) / std
    return x


def thumbnail_image(t: "torch.Tensor", size: int) -> "Image.Image":
    """The picture a thumbnail is made from: at most `size` px a side, resized on the device
    and brought back to the CPU as a small PIL image (`make_thumbnail` encodes it)."""
    import torch
    from PIL import Image

    h, w = t.shape[1:]
    scale = min(1.0, size / max(h, w))
    small = resize(t, (max(1, round(w * scale)), max(1, round(h * scale)))) if scale < 1 else t.float()
    return Image.fromarray(small.to("cpu", dtype=torch.uint8).permute(1, 2, 0).numpy(), "RGB")


def gpu_jpeg(device: str) -> Callable[[bytes, int], "torch.Tensor"]:
    """nvJPEG through torchvision: JPEG bytes -> uint8 [3, H, W] on `device`."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(data: bytes, draft: int) -> "torch.Tensor":  # the GPU decodes in full: no draft
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB, device=device)

    return decode


def pil_jpeg(data: bytes, draft: int) -> "torch.Tensor":
    """The CPU's stand-in: PIL's decode at reduced DCT scale, as a uint8 tensor [3, H, W]."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if draft:
            im.draft("RGB", (draft, draft))
        rgb = im.convert("RGB")
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def check(device: str) -> None:
    """Refuse `decode = "device"` on a CUDA GPU without torchvision, before a run starts
    (rather than failing every photo). torchvision is not in the [gpu] extra: its wheels pin
    one torch release, and installing it must not replace the user's CUDA build of torch."""
    from searchengine.config.devices import is_cuda

    if not is_cuda(device):
        return
    try:
        importlib.import_module("torchvision.io")
    except Exception as e:  # noqa: BLE001 - ImportError, or a torchvision built for another torch
        raise SearchEngineError(
            f"decode device on a GPU decodes JPEGs with torchvision, which cannot be imported here ({type(e).__name__}: {e}); "
            "pip install the torchvision release made for your torch, or use decode fast"
        ) from None


def decoder_for(device: str) -> Callable[[bytes, int], "torch.Tensor"]:
    from searchengine.config.devices import is_cuda

    return gpu_jpeg(device) if is_cuda(device) else pil_jpeg


def decode_on_device(
    data: bytes, *, max_pixels: int, decoder: Callable[[bytes, int], "torch.Tensor"], draft: int = 0
) -> OnDevice | None:
    """A plain JPEG decoded by `decoder` with its orientation applied; None for anything else
    (the caller decodes it with PIL). Raises BadImageError as `decode_image` does for a file
    that is not an image or is over `max_pixels`."""
    im = open_checked(data, max_pixels=max_pixels)
    if im.format != "JPEG" or im.mode not in ("RGB", "L"):  # CMYK, YCCK: PIL's conversion
        return None
    w, h = im.size
    exif = im.getexif()
    orientation = exif.get(ORIENTATION_TAG)
    try:
        t = decoder(data, draft)
    except Exception:  # noqa: BLE001 - a JPEG this decoder refuses goes to PIL, which names the problem
        return None
    if t.shape[0] != 3:
        return None
    meta = meta_of((h, w) if orientation in (5, 6, 7, 8) else (w, h), exif)
    return OnDevice(orient(t, orientation), meta)
