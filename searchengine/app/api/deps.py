"""The API's state and its dependencies: what routes are handed (the service, the app's
state, the paging and filter parameters every search shares)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime
from typing import Annotated, Literal, Protocol

from fastapi import Depends, Path, Query, Request
from pydantic import BeforeValidator

from searchengine.app.api.guards import PLAIN_TEXT, refuse_control_characters, strict_image_id, strict_iso_date
from searchengine.errors import FileReadTimeout, NotReady
from searchengine.util.metrics import Metrics
from searchengine.media.imageio import FILE_TYPES, ORIENTATIONS
from searchengine.search import MAX_K, MAX_OFFSET, Filters
from searchengine.service import QueryService
from searchengine.config.settings import Settings


class Companion(Protocol):
    """Something started beside the service (the watcher of `serve --watch`)."""

    def stop(self) -> None: ...

    def health(self) -> str | None:
        """None while it works; else what is wrong, for /healthz."""


class AppState:
    """What the app holds: its settings, metrics and file-read pool, the service once loaded
    (or why it could not be), and what runs beside it."""

    def __init__(self, settings: Settings, metrics: Metrics, files: FileReads) -> None:
        self.settings = settings
        self.metrics = metrics
        self.files = files
        self.service: QueryService | None = None
        self.error: str | None = None
        self.companions: list[Companion] = []

    def problem(self) -> str | None:
        """What keeps the service from being healthy once it is up: a damaged store, a
        companion that failed to start or stopped working."""
        if self.service is None:
            return self.error
        return self.service.library.health() or self.error or next(
            (p for p in (c.health() for c in self.companions) if p), None
        )


class FileReads:
    """Reads of image files (thumbnails, previews, originals) on a small pool of their own,
    each given `timeout_s`: a file that blocks (a hung network mount, a FIFO) ties up this pool
    at worst, never the threads searches run on, and its request ends in a 504."""

    def __init__(self, workers: int, timeout_s: float) -> None:
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="file-read")
        self.timeout_s = timeout_s

    async def run(self, fn, *args):
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self.pool, fn, *args), self.timeout_s)
        except asyncio.TimeoutError:
            raise FileReadTimeout(f"reading the image's file took over {self.timeout_s:g} s (a slow or hung disk?)") from None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def plain_text_parameters(request: Request) -> None:
    """A NUL or other control character in a query parameter is a 400 before any store call."""
    refuse_control_characters(request.query_params)


def get_state(request: Request) -> AppState:
    return request.app.state.searchengine


def get_service(state: Annotated[AppState, Depends(get_state)]) -> QueryService:
    if state.service is None:
        raise NotReady(state.error)
    return state.service


State = Annotated[AppState, Depends(get_state)]
Service = Annotated[QueryService, Depends(get_service)]
K = Annotated[int, Query(ge=1, le=MAX_K, description="how many hits per page")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="hits to skip (paging)")]
MinScore = Annotated[float | None, Query(description="drop hits whose final score is below this")]
Folder = Annotated[
    str | None,
    Query(description="only images with a file below this folder: an absolute path (/home/me/Pictures/Trips) or "
          "one from home (~/Pictures), matched as it is; or a folder's name or the last parts of its path "
          "(Trips, Trips/Winter 2022), matched anywhere in the library, in any case. Not found if no indexed "
          "folder matches (a 404 that names the nearest one)", min_length=1, max_length=4096, pattern=PLAIN_TEXT),
]
TakenAfter = Annotated[
    date | datetime | None, BeforeValidator(strict_iso_date),
    Query(description="only images taken on or after (ISO date or date-time)"),
]
TakenBefore = Annotated[
    date | datetime | None, BeforeValidator(strict_iso_date),
    Query(description="only images taken on or before (ISO date or date-time)"),
]
Camera = Annotated[str | None, Query(max_length=200, pattern=PLAIN_TEXT, description="only images from this camera (a value of /api/facets)")]
Lens = Annotated[str | None, Query(max_length=200, pattern=PLAIN_TEXT, description="only images taken with this lens (a value of /api/facets)")]
FileType = Annotated[
    Literal[tuple(FILE_TYPES)] | None,
    Query(alias="type", description="only images with a file of this type"),
]
Orientation = Annotated[
    Literal[ORIENTATIONS] | None, Query(description="only images of this shape, as shown"),
]
# Path before the validator: after it, pydantic writes ge/le into the schema as they are, which
# are not JSON Schema keywords (0 was "valid" to a client reading the schema, and got a 422).
ImageId = Annotated[
    int, Path(ge=1, le=2**63 - 1, description="an image id from a search hit"), BeforeValidator(strict_image_id)
]


@dataclass
class FilterQuery:
    """The filters every search route takes, and the facets' counts."""

    folder: Folder = None
    taken_after: TakenAfter = None
    taken_before: TakenBefore = None
    camera: Camera = None
    lens: Lens = None
    file_type: FileType = None
    orientation: Orientation = None

    @property
    def filters(self) -> Filters:
        return Filters.build(
            self.folder, self.taken_after, self.taken_before, camera=self.camera, lens=self.lens,
            file_type=self.file_type, orientation=self.orientation,
        )


@dataclass
class PageQuery(FilterQuery):
    """Paging and cutoff, with the filters: the parameters every search route shares."""

    k: K = 24
    offset: Offset = 0
    min_score: MinScore = None


Paging = Annotated[PageQuery, Depends()]
Filtering = Annotated[FilterQuery, Depends()]


def get_files(state: Annotated[AppState, Depends(get_state)]) -> FileReads:
    return state.files


Files = Annotated[FileReads, Depends(get_files)]
