"""The indexer's stages: plain callables on plain data, in the shape reader -> mapper -> writer.

    scan (FileEntry) -> Read (bytes, sha256) -> [runner: content already indexed?] -> Decode
    (pixels for the retrieval model and the captioner, thumbnail, metadata) -> Embed (a batch:
    ITC vectors + ViT output) -> Caption (a batch) -> the Library writes the batch

Each stage holds only what it needs to do its job (a reader function, a preprocessor, the
thumbnail size, a model) and maps immutable values to new immutable values: nothing here
opens the store or the vector index, so the read and decode stages can run in threads
(`searchengine.indexing.pipeline`), in processes or on a cluster's workers, and any runner that keeps the
order "embed, caption, write" can drive them. The one database question, "is this content
indexed already?", is the runner's, asked once per batch of reads (`Library.indexed_hashes`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Sequence

from searchengine.indexing.scan import FileEntry
from searchengine.models.captioner import Caption
from searchengine.errors import BadImageError
from searchengine.media.imageio import ImageMeta, decode_image, read_file, sha256_of
from searchengine.media.preprocess import Preprocessor
from searchengine.media.thumbnails import make_thumbnail

if TYPE_CHECKING:
    import numpy as np
    import torch

    from searchengine.models.captioner import Captioner
    from searchengine.models.retrieval import RetrievalModel
    from searchengine.config.settings import Settings

log = logging.getLogger(__name__)


# The fast decode keeps this many times the pixels each output needs a side. Measured by
# benchmarks/feed_rate.py on 12 MP JPEGs: margin 1 (a 4000x3000 photo decoded at 1/4 scale)
# gives ITC cosine >= 0.999999 per vector against the exact path, at 5.4x its speed.
DRAFT_MARGIN = 1


# -- values passed between stages ---------------------------------------------------------


@dataclass(frozen=True)
class Failed:
    """A file that could not be read or decoded, and why (`reason` is a short code)."""

    entry: FileEntry
    reason: str
    message: str


@dataclass(frozen=True)
class Read:
    """A file's bytes and their hash. `data` is empty for an empty file (then no hash)."""

    entry: FileEntry
    sha256: str
    data: bytes


@dataclass(frozen=True)
class Known:
    """A file whose content the index already has: linked to it, never decoded."""

    entry: FileEntry
    sha256: str


@dataclass(frozen=True)
class Decoded:
    """A file ready for the models: pixels for each, its thumbnail and metadata."""

    entry: FileEntry
    sha256: str
    meta: ImageMeta
    pixels: "torch.Tensor"  # the retrieval model's input [3, S, S]
    thumbnail: bytes  # JPEG
    caption_pixels: "torch.Tensor | None" = None  # the captioner's input, when captioning
    caption_error: str | None = None  # why the captioner's input could not be made


@dataclass(frozen=True)
class Embedded:
    """A decoded image with its ITC vectors [Q, D] and ViT output (for the feature cache)."""

    item: Decoded
    itc: "np.ndarray"
    vit: "np.ndarray | None"
    made_by: str = ""  # how the model that made the vectors ran: "bfloat16 on cpu" (RetrievalModel.made_by)

    @property
    def entry(self) -> FileEntry:
        return self.item.entry

    @property
    def meta(self) -> ImageMeta:
        return self.item.meta


# -- stages --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadStage:
    """FileEntry -> Read | Failed."""

    reader: Callable[[str], bytes] = read_file

    def __call__(self, entry: FileEntry) -> Read | Failed:
        try:
            data = self.reader(entry.path)
        except BadImageError as e:
            return Failed(entry, e.reason, str(e))
        except MemoryError:
            return Failed(entry, "too_large", "not enough memory to read this file")
        except Exception as e:  # noqa: BLE001 - one file must not stop the run
            log.exception("unexpected error reading %s", entry.path)
            return Failed(entry, "read_error", f"{type(e).__name__}: {e}")
        return Read(entry, sha256_of(data) if data else "", data)


@dataclass(frozen=True)
class DecodeStage:
    """Read -> Decoded | Failed; anything else (Known, Failed) passes through unchanged.

    Each image is decoded once: the retrieval pixels, the caption pixels and the thumbnail all
    come from that one decode (the thumbnail shows transparency, the models do not).
    """

    preprocess: Preprocessor
    max_pixels: int
    thumbnail_size: int
    thumbnail_quality: int = 82
    caption_preprocess: Preprocessor | None = None
    # "fast": a JPEG is decoded at the smallest DCT scale that still gives every output
    # (model, captioner, thumbnail) DRAFT_MARGIN times the pixels it needs a side, a fraction of
    # a full decode; "exact": decoded in full, as the reference processor is given it;
    # "device": a plain JPEG is decoded on `device` (nvJPEG on a CUDA GPU) and resized there
    # (searchengine/media/device_decode.py), anything else as "fast".
    decode: str = "exact"
    device: str = "cpu"

    @property
    def draft(self) -> int | None:
        if self.decode not in ("fast", "device"):
            return None
        sizes = [self.preprocess.side(), self.thumbnail_size]
        if self.caption_preprocess is not None:
            sizes.append(self.caption_preprocess.side())
        return DRAFT_MARGIN * max(sizes)

    def __call__(self, item: Read | Known | Failed) -> Decoded | Known | Failed:
        if not isinstance(item, Read):
            return item
        try:
            if self.decode == "device":
                on_device = self._on_device(item)
                if on_device is not None:
                    return on_device
            decoded = decode_image(item.data, max_pixels=self.max_pixels, sha256=item.sha256 or None, draft=self.draft)
            pixels = self.preprocess([decoded.image])[0]
            thumbnail = make_thumbnail(decoded.display, self.thumbnail_size, self.thumbnail_quality)
            caption_pixels = caption_error = None
            if self.caption_preprocess is not None:
                try:
                    caption_pixels = self.caption_preprocess([decoded.image])[0]
                except Exception as e:  # noqa: BLE001 - the image is still embedded
                    caption_error = f"{type(e).__name__}: {e}"
            return Decoded(item.entry, item.sha256, decoded.meta, pixels, thumbnail, caption_pixels, caption_error)
        except BadImageError as e:
            return Failed(item.entry, e.reason, str(e))
        except MemoryError:
            return Failed(item.entry, "too_large", "not enough memory to decode this image")
        except Exception as e:  # a decoder bug on one file must not stop the run
            log.exception("unexpected error decoding %s", item.entry.path)
            return Failed(item.entry, "decode_error", f"{type(e).__name__}: {e}")


    def _on_device(self, item: Read) -> Decoded | None:
        """The "device" path (see `searchengine.media.device_decode`); None where it does not apply."""
        from searchengine.media.device_decode import decode_on_device, decoder_for, model_input, tensor_ready, thumbnail_image

        # Processors the tensor path cannot follow (a crop, padding) send every file to PIL,
        # before anything is decoded.
        if not all(tensor_ready(p) for p in (self.preprocess, self.caption_preprocess) if p is not None):
            return None
        got = decode_on_device(item.data, max_pixels=self.max_pixels, decoder=decoder_for(self.device), draft=self.draft or 0)
        if got is None:
            return None
        pixels = model_input(got.pixels, self.preprocess)
        caption_pixels = model_input(got.pixels, self.caption_preprocess) if self.caption_preprocess is not None else None
        thumbnail = make_thumbnail(thumbnail_image(got.pixels, self.thumbnail_size), self.thumbnail_size, self.thumbnail_quality)
        return Decoded(item.entry, item.sha256, got.meta, pixels, thumbnail, caption_pixels)


@dataclass(frozen=True)
class Staged:
    """A batch's pixels on their way to the model's device. On a CUDA GPU the copy runs from
    pinned memory on a side stream, so it overlaps the compute of the batch before; `ready`
    is the event the compute waits for (None where the pixels are there already)."""

    pixels: "torch.Tensor"
    ready: object = None
    host: "torch.Tensor | None" = None  # the pinned source, kept alive until the copy is done

    def wait(self) -> "torch.Tensor":
        if self.ready is not None:
            import torch

            stream = torch.cuda.current_stream(self.pixels.device)
            stream.wait_event(self.ready)
            self.pixels.record_stream(stream)  # the caching allocator must not reuse it early
        return self.pixels


_copy_streams: dict = {}


def stage_pixels(pixels: Sequence["torch.Tensor"], device: str) -> Staged:
    """Stack a batch's pixels and start their copy to `device` (nothing to copy on a CPU)."""
    import torch

    from searchengine.config.devices import is_cuda

    stacked = torch.stack(list(pixels))
    if not is_cuda(device) or stacked.device.type != "cpu":  # decoded on the device: there already
        return Staged(stacked)
    stream = _copy_streams.get(device)
    if stream is None:
        stream = _copy_streams[device] = torch.cuda.Stream(device)
    host = stacked.pin_memory()
    with torch.cuda.stream(stream):
        on_device = host.to(device, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(stream)
    return Staged(on_device, ready, host)


@dataclass(frozen=True)
class EmbedStage:
    """A batch of Decoded -> Embedded, in one model pass. `keep_vit`: return the ViT output
    too (for the feature cache that ITM re-ranking reads on CPUs).

    A batch that does not fit in the device's memory is split in halves and embedded half by
    half (the same vectors: every image is computed on its own), so an automatic batch size
    that guessed too high slows a run down rather than ending it.
    """

    model: "RetrievalModel"
    keep_vit: bool = False

    def stage(self, batch: Sequence[Decoded]) -> Staged | None:
        return stage_pixels([d.pixels for d in batch], self.model.device) if batch else None

    def __call__(self, batch: Sequence[Decoded], staged: Staged | None = None) -> list[Embedded]:
        if not batch:
            return []
        staged = staged or self.stage(batch)
        return self._embed(batch, staged.wait())

    def _embed(self, batch: Sequence[Decoded], pixels: "torch.Tensor") -> list[Embedded]:
        import torch

        try:
            emb = self.model.embed_pixels(pixels)
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError, under its older name
            if len(batch) < 2:
                raise
            log.warning("a batch of %d images does not fit in the device's memory: embedding it in halves "
                        "(a smaller --batch-size avoids the retry)", len(batch))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(batch) // 2
            return self._embed(batch[:half], pixels[:half]) + self._embed(batch[half:], pixels[half:])
        vit = emb.vit.float().cpu().numpy() if self.keep_vit else None
        made_by = self.model.made_by
        return [Embedded(d, emb.itc[i], vit[i] if vit is not None else None, made_by) for i, d in enumerate(batch)]


def caption_batch(captioner: "Captioner", pixels: Sequence["torch.Tensor | None"], errors: Sequence[str | None]) -> list[Caption]:
    """One Caption per image of a batch, in one captioner call: an image without pixels gets
    its error instead (a batch that fails is retried image by image by the captioner)."""
    import torch

    ready = [p for p in pixels if p is not None]
    made = iter(captioner.caption_pixels(torch.stack(ready)) if ready else [])
    return [next(made) if p is not None else Caption(None, e or "no caption input") for p, e in zip(pixels, errors)]


@dataclass(frozen=True)
class CaptionStage:
    """A batch of Embedded -> the same with each image's caption (or why it has none) in its
    metadata. A batch that fails leaves its images without captions, with the reason."""

    captioner: "Captioner"

    def __call__(self, batch: Sequence[Embedded]) -> list[Embedded]:
        captions = caption_batch(
            self.captioner, [e.item.caption_pixels for e in batch], [e.item.caption_error for e in batch]
        )
        out = []
        for e, c in zip(batch, captions):
            meta = replace(
                e.item.meta, caption=c.text, caption_error=c.error,
                caption_model=self.captioner.name if c.text is not None else None,
            )
            out.append(replace(e, item=replace(e.item, meta=meta)))
        return out


# -- captioning an existing index (`searchengine caption`): the caption-only mapper ----------


@dataclass(frozen=True)
class CaptionInput:
    """An indexed image ready for the captioner: the file it was read from and its pixels, or
    why none of its files could be read."""

    image_id: int
    path: str
    pixels: "torch.Tensor | None"
    error: str | None = None


@dataclass(frozen=True)
class CaptionDecodeStage:
    """(image id, its paths) -> CaptionInput from the first of its files that decodes."""

    preprocess: Preprocessor
    max_pixels: int
    reader: Callable[[str], bytes] = read_file

    def __call__(self, item: tuple[int, list[str]]) -> CaptionInput:
        image_id, paths = item
        problems = []
        for path in paths:
            try:
                image = decode_image(self.reader(path), max_pixels=self.max_pixels).image
                return CaptionInput(image_id, path, self.preprocess([image])[0])
            except BadImageError as e:
                problems.append(str(e))
            except Exception as e:  # noqa: BLE001 - one file must not stop the run
                log.exception("unexpected error reading %s", path)
                problems.append(f"{type(e).__name__}: {e}")
        return CaptionInput(image_id, paths[0] if paths else f"image {image_id}", None, "; ".join(problems) or "the image has no file")


# -- how the stages are set up: decided here once, for every runner ---------------------------


def decode_stage(
    model: "RetrievalModel", settings: "Settings", thumbnail_format: tuple[int, int], caption_preprocess: Preprocessor | None = None,
) -> DecodeStage:
    """The decode stage every run uses (index, watch, the Ray runner, reindex, eval and the
    fine-tune's ViT pass): `settings.decode` on the model's own device, so `decode = device`
    decodes on the GPU the model is on (reindex and eval had left the device out, and decoded
    on the CPU), with the thumbnail format of the library written to. A device decode that
    cannot work here is refused before any file is read."""
    if settings.decode == "device":
        from searchengine.media.device_decode import check

        check(model.device)
    return DecodeStage(
        model.preprocessor, settings.max_image_pixels, *thumbnail_format, caption_preprocess, settings.decode, model.device,
    )


def index_batch_size(model: "RetrievalModel", settings: "Settings", captioner_bytes: int = 0) -> int:
    """Images per model batch for every run: the setting, else what the device holds (on a
    CUDA GPU as many as its free memory takes, the captioner's share counted); reindex and
    eval had taken the CPU-sized device default on a GPU too."""
    return settings.batch_size or model.index_batch(captioner_bytes)
