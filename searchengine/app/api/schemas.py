"""The API's request and response models: what the OpenAPI schema documents."""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, Field

from searchengine.app.api.guards import NOT_BLANK
from searchengine.library import ImageDetail
from searchengine.search import Hit, Page
from searchengine.models.conversation import MAX_TURNS, Decoding, Turn
from searchengine.models.vqa import MAX_ANSWER_CHARS, MAX_QUESTION_CHARS


class Mode(str, Enum):
    hybrid = "hybrid"
    semantic = "semantic"
    keyword = "keyword"


class HitOut(BaseModel):
    id: int
    path: str
    paths: list[str]
    width: int
    height: int
    taken_at: str | None
    camera: str | None
    caption: str | None
    score: float
    itc: float
    itm: float | None
    keyword: float | None
    thumbnail_url: str
    preview_url: str
    file_url: str


class SearchOut(BaseModel):
    query: str | None
    mode: str | None
    k: int
    offset: int
    next_offset: int | None
    reranked: int
    strong: int | None = None  # re-ranked hits with ITM P(match) >= min_itm (else 0.5); None: none re-ranked
    hits: list[HitOut]
    timings_ms: dict[str, float]


class FileOut(BaseModel):
    path: str
    size: int


class ImageOut(BaseModel):
    id: int
    paths: list[str]
    files: list[FileOut]
    width: int
    height: int
    taken_at: str | None
    camera: str | None
    gps_lat: float | None
    gps_lon: float | None
    caption: str | None
    caption_model: str | None
    caption_error: str | None
    thumbnail_url: str
    preview_url: str
    file_url: str

    @classmethod
    def of(cls, d: ImageDetail) -> "ImageOut":
        """The library's record of an image, as the API shows it."""
        return cls(
            id=d.id, paths=[f.path for f in d.files], files=[FileOut(path=f.path, size=f.size) for f in d.files],
            width=d.width, height=d.height, taken_at=d.taken_at, camera=d.camera, gps_lat=d.gps_lat, gps_lon=d.gps_lon,
            caption=d.caption, caption_model=d.caption_model, caption_error=d.caption_error, **image_urls(d.id),
        )


class FolderOut(BaseModel):
    path: str
    images: int


class FoldersOut(BaseModel):
    folders: list[FolderOut]
    total: int  # folders that matched, before `limit`


class HealthOut(BaseModel):
    status: str
    error: str | None = None


class ErrorOut(BaseModel):
    error: str


FILE_RESPONSES: dict = {
    200: {"content": {"image/*": {}}, "description": "the image"},
    404: {"model": ErrorOut, "description": "no image has this id, or its file is gone"},
    409: {"model": ErrorOut, "description": "the file is there but no longer a readable image"},
    504: {"model": ErrorOut, "description": "reading the file took too long (a slow or hung disk)"},
}


def image_urls(image_id: int) -> dict[str, str]:
    """The URLs of an image's files, as every answer that shows an image gives them."""
    base = f"/api/images/{image_id}"
    return {"thumbnail_url": f"{base}/thumbnail", "preview_url": f"{base}/preview", "file_url": f"{base}/file"}


def hit_out(h: Hit) -> HitOut:
    """The one JSON form of a hit (`Hit.as_json`), with the URLs of the image's files."""
    return HitOut(**h.as_json(), **image_urls(h.image_id))


def search_out(page: Page, k: int, offset: int, mode: str | None = None) -> SearchOut:
    return SearchOut(
        query=page.query, mode=mode, k=k, offset=offset, next_offset=offset + k if page.has_more else None,
        reranked=page.reranked, strong=page.strong, hits=[hit_out(h) for h in page.hits],
        timings_ms={name: round(ms, 3) for name, ms in page.timings_ms.items()},
    )


# The routes that look something up by what the request names: an image id, a folder filter, an
# example image (like/unlike). A name that matches nothing is a 404 whose message says which.
NOT_FOUND = {404: {"model": ErrorOut, "description": "an image id or a folder filter that matches nothing (which, in the message)"}}


class AskIn(BaseModel):
    question: str = Field(
        min_length=1, max_length=MAX_QUESTION_CHARS, pattern=NOT_BLANK, description="a question about the photo (not only spaces)"
    )


class AskOut(BaseModel):
    question: str
    answer: str
    model: str
    timings_ms: dict[str, float]


class ExplainOut(BaseModel):
    image_id: int | None  # None for an upload
    query: str
    grid: list[list[float]]  # [rows][columns] over the ViT's patches, the peak 1 (16 x 16 for ViT-g at 224 px)
    itm: float  # P(match) of the query and the image, as re-ranking scores it
    overlay_url: str | None  # the map over the preview, as a PNG (indexed images)
    overlay_png: str | None  # the map over the upload, a PNG in base64 (uploads)
    timings_ms: dict[str, float]

    @classmethod
    def of(cls, explained) -> "ExplainOut":
        """An indexed image's map links its overlay; an upload's carries it."""
        import base64
        from urllib.parse import urlencode

        png = base64.b64encode(explained.png).decode() if explained.png is not None else None
        url = None if explained.image_id is None else f"/api/images/{explained.image_id}/explain.png?{urlencode({'q': explained.query})}"
        return cls(
            image_id=explained.image_id, query=explained.query, grid=explained.heat.grid.round(4).tolist(),
            itm=explained.heat.itm, overlay_url=url, overlay_png=png, timings_ms=explained.timings_ms,
        )


class TurnIn(BaseModel):
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS, pattern=NOT_BLANK)
    answer: str = Field(max_length=MAX_ANSWER_CHARS)


class DecodingIn(BaseModel):
    method: Literal["greedy", "beam", "nucleus"] = "greedy"
    max_new_tokens: int = Field(30, ge=1, le=200)
    num_beams: int = Field(3, ge=2, le=8, description="beam: beams kept")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus: the share of probability sampled from")
    temperature: float = Field(1.0, ge=0.05, le=2, description="nucleus: below 1 surer, above 1 more varied")


class ChatIn(BaseModel):
    question: str = Field(
        min_length=1, max_length=MAX_QUESTION_CHARS, pattern=NOT_BLANK, description="the new question (not only spaces)"
    )
    turns: list[TurnIn] = Field(default_factory=list, max_length=MAX_TURNS,
                                description="the conversation so far, oldest first (the server keeps none)")
    decoding: DecodingIn = Field(default_factory=DecodingIn)
    stream: bool = Field(False, description="answer as server-sent events, a `data` event per piece, then `done`")

    def conversation(self) -> tuple[list[Turn], Decoding]:
        return [Turn(t.question, t.answer) for t in self.turns], Decoding(**self.decoding.model_dump())


class ChatOut(BaseModel):
    question: str
    answer: str
    model: str
    kept_turns: int  # of the turns sent, how many the prompt kept (the oldest are cut to fit the model's context)
    timings_ms: dict[str, float]


class VqaOut(BaseModel):
    available: bool  # whether questions can be asked (the model loads on the first one)
    model: str | None
    reason: str | None  # why not, when not


class DuplicateOut(BaseModel):
    id: int
    path: str
    paths: list[str]
    width: int
    height: int
    bytes: int  # the first file's size
    taken_at: str | None
    score: float  # its best image-to-image score against another of the group
    thumbnail_url: str
    preview_url: str
    file_url: str


class DuplicateGroupOut(BaseModel):
    images: list[DuplicateOut]  # best-connected first


class DuplicatesOut(BaseModel):
    threshold: float
    total: int  # groups in all
    offset: int
    next_offset: int | None
    images: int  # images compared
    pairs_scored: int  # pairs the vector index proposed, scored exactly
    groups: list[DuplicateGroupOut]  # largest first
    timings_ms: dict[str, float]


class FacetValue(BaseModel):
    value: str
    images: int


class FacetsOut(BaseModel):
    """Per facet, its values with how many images choosing each would give (the other
    filters applied), most first."""

    camera: list[FacetValue]
    lens: list[FacetValue]
    type: list[FacetValue]
    orientation: list[FacetValue]


class FailureOut(BaseModel):
    path: str
    reason: str  # a short code: unreadable, too_large, not_an_image, ...
    error: str


class BackupOut(BaseModel):
    name: str
    taken: str  # UTC, YYYYmmddTHHMMSS.ffffff
    bytes: int


class StatsOut(BaseModel):
    """What the index holds (`searchengine stats --json` shows the same, less the last field)."""

    data_dir: str | None  # None: hidden from this caller (see `server_paths_hidden`)
    store: str | None
    images: int
    files: int
    failed: int
    failures_by_reason: dict[str, int]
    failures: list[FailureOut]
    roots: list[str]
    model: str | None
    model_fingerprint: str | None
    model_dtype: str | None
    made_by: list[str]  # how the model ran that made the vectors ("bfloat16 on cpu"), first first
    index_type: str
    vector_index: dict[str, Any]  # the tier and its parameters (they differ by tier)
    links: str
    vectors: int
    bytes_on_disk: dict[str, int]
    captioned: int
    caption_models: dict[str, int]
    caption_failures: int
    backups: list[BackupOut]
    server_paths_hidden: bool
