"""What the store takes in and hands out: plain records, no database in them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from searchengine.errors import ModelMismatchError
from searchengine.media.imageio import ImageMeta


@dataclass(frozen=True)
class ModelInfo:
    name: str
    fingerprint: str
    num_vectors: int
    dim: int
    vit_shape: tuple[int, int]
    dtype: str = ""  # what the first run embedded in; every run's: `Store.made_by`
    device: str = ""  # the kind of device it ran on: cpu, cuda, mps ("" in indexes from before it was recorded)

    @property
    def made_by(self) -> str:
        return f"{self.dtype} on {self.device}" if self.device else self.dtype

    def __post_init__(self) -> None:
        object.__setattr__(self, "vit_shape", tuple(self.vit_shape))


def mismatch_message(have: ModelInfo, info: ModelInfo) -> str:
    """What differs between the model an index was built with and the one opened on it."""
    shape = lambda m: f"{m.num_vectors} vectors of {m.dim} a image, ViT output {m.vit_shape[0]}x{m.vit_shape[1]}"  # noqa: E731
    arch = "" if shape(have) == shape(info) else f" It is another architecture too: {shape(info)} against the index's {shape(have)}."
    if have.name == info.name:
        return (
            f"the weights of model {info.name!r} have changed since this index was built (fingerprint "
            f"{have.fingerprint} then, {info.fingerprint} now), so its vectors are not this model's.{arch} "
            f"Put the old weights back, re-embed the library with the new ones (searchengine reindex --model "
            f"{info.name}), or use another --data-dir"
        )
    return (
        f"this index was built with model {have.name!r} (fingerprint {have.fingerprint}); {info.name!r} "
        f"(fingerprint {info.fingerprint}) is another checkpoint.{arch} Use the index's own (--model {have.name}, "
        f"or no --model), re-embed the library with the other (searchengine reindex --model {info.name}), "
        "or use another --data-dir"
    )


def recorded_as(have: ModelInfo | None, info: ModelInfo, former: Iterable[str] = ()) -> str:
    """How an index that recorded `have` stands to the model `info`: "nothing" recorded yet,
    the "same" weights, or the same weights under a "former" fingerprint (one an earlier version
    took of them in bf16 or fp16, see `models.former_fingerprints`), whose record a writer brings
    up to date. Another model raises ModelMismatchError, saying what differs."""
    if have is None:
        return "nothing"
    if have.fingerprint == info.fingerprint:
        return "same"
    if have.fingerprint in set(former) and have.vit_shape == info.vit_shape:
        return "former"
    raise ModelMismatchError(mismatch_message(have, info))


@dataclass(frozen=True)
class IndexedFile:
    path: str
    size: int
    mtime_ns: int  # size and mtime as indexed: a file that differs is not the indexed content


@dataclass(frozen=True)
class ImageDetail:
    """Everything the library knows of one image, with its files (oldest first)."""

    id: int
    files: list[IndexedFile]
    width: int
    height: int
    taken_at: str | None
    camera: str | None
    gps_lat: float | None
    gps_lon: float | None
    caption: str | None
    caption_model: str | None
    caption_error: str | None
    sha256: str = ""  # the indexed content's: what a file must still hash to, to be served as it
    lens: str | None = None  # EXIF LensModel (None before schema 4)


@dataclass(frozen=True)
class FileState:
    size: int
    mtime_ns: int
    status: str
    image_id: int | None


@dataclass
class ImageRecord:
    id: int
    paths: list[str]  # in the order they were first indexed: the original first
    width: int
    height: int
    taken_at: str | None
    camera: str | None
    caption: str | None


@dataclass(frozen=True)
class FolderCount:
    path: str
    images: int  # distinct images with a file in this folder or below it


@dataclass
class Stats:
    images: int
    files: int
    failed: int
    failures_by_reason: dict[str, int]
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # path, reason, error
    roots: list[str] = field(default_factory=list)
    model: ModelInfo | None = None
    captioned: int = 0
    caption_models: dict[str, int] = field(default_factory=dict)
    caption_failures: int = 0


@dataclass(frozen=True)
class NewImage:
    """An embedded image, as the indexer makes it and the library and the store write it: its
    content hash, metadata (caption included), ITC vectors [Q, D], ViT output (None: not
    cached), thumbnail JPEG, and file. The store keeps the first three and the file; the
    library the rest in its caches."""

    sha256: str
    meta: ImageMeta
    itc: np.ndarray
    vit: np.ndarray | None
    thumbnail: bytes
    file: tuple[str, int, int]  # path, size, mtime_ns
