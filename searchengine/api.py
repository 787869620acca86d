"""The HTTP API (FastAPI). Routes are thin: the work is in `service.QueryService`.

The model and the library are built in the app's lifespan, in a background thread, so the
server answers at once: `/healthz` says "loading" (503) until they are ready, and so do the
routes that need them. Nothing heavy happens at import time.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.util
import ipaddress
import logging
import mimetypes
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date, datetime
from enum import Enum
from pathlib import Path as FilePath
from typing import Annotated, Callable, Protocol

from fastapi import Depends, FastAPI, File, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, BeforeValidator
from sqlalchemy.exc import DatabaseError
from starlette.exceptions import HTTPException as StarletteHTTPException

from searchengine import wiring
from searchengine.api_guards import (
    PLAIN_TEXT,
    UploadLimit,
    loggable_query,
    refuse_control_characters,
    strict_image_id,
    strict_iso_date,
)
from searchengine.errors import (
    BadImageError,
    ModelMismatchError,
    QueryError,
    SearchEngineError,
    StoreDamagedError,
    StoreMissingError,
)
from searchengine.metrics import Metrics
from searchengine.search import Filters, Hit
from searchengine.service import ImageNotFoundError, Page, QueryService, ServiceBusy
from searchengine.settings import Settings
from searchengine.store import damage, is_damage

log = logging.getLogger("searchengine.api")
access_log = logging.getLogger("searchengine.access")

MAX_K = 200
MAX_OFFSET = 10_000


class Mode(str, Enum):
    hybrid = "hybrid"
    semantic = "semantic"
    keyword = "keyword"


# -- response models ----------------------------------------------------------------------


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


# -- state and dependencies ---------------------------------------------------------------


class Companion(Protocol):
    """Something started beside the service (the watcher of `serve --watch`)."""

    def stop(self) -> None: ...

    def health(self) -> str | None:
        """None while it works; else what is wrong, for /healthz."""


class AppState:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
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


class NotReady(Exception):
    pass


class FileTimeout(Exception):
    pass


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
            raise FileTimeout(f"reading the image's file took over {self.timeout_s:g} s (a slow or hung disk?)") from None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _plain_text_parameters(request: Request) -> None:
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
          "(Trips, Trips/Winter 2022), matched anywhere in the library, in any case. 400 if no indexed "
          "folder matches", pattern=PLAIN_TEXT),
]
TakenAfter = Annotated[
    date | datetime | None, BeforeValidator(strict_iso_date),
    Query(description="only images taken on or after (ISO date or date-time)"),
]
TakenBefore = Annotated[
    date | datetime | None, BeforeValidator(strict_iso_date),
    Query(description="only images taken on or before (ISO date or date-time)"),
]
ImageId = Annotated[
    int, BeforeValidator(strict_image_id), Path(ge=1, le=2**63 - 1, description="an image id from a search hit")
]


@dataclass
class PageQuery:
    """Paging, cutoff and filters: the parameters every search route shares."""

    k: K = 24
    offset: Offset = 0
    min_score: MinScore = None
    folder: Folder = None
    taken_after: TakenAfter = None
    taken_before: TakenBefore = None

    @property
    def filters(self) -> Filters:
        return Filters.build(self.folder, self.taken_after, self.taken_before)


Paging = Annotated[PageQuery, Depends()]


def _hit(h: Hit) -> HitOut:
    return HitOut(
        **h.as_json(), thumbnail_url=f"/api/images/{h.image_id}/thumbnail",
        preview_url=f"/api/images/{h.image_id}/preview", file_url=f"/api/images/{h.image_id}/file",
    )


def _search_out(page: Page, k: int, offset: int, mode: str | None = None) -> SearchOut:
    return SearchOut(
        query=page.query, mode=mode, k=k, offset=offset, next_offset=offset + k if page.has_more else None,
        reranked=page.reranked, hits=[_hit(h) for h in page.hits],
        timings_ms={name: round(ms, 3) for name, ms in page.timings_ms.items()},
    )


# -- the app ------------------------------------------------------------------------------


def default_loader(settings: Settings):
    """(model, library) of an existing index, with the model it was built with by default."""

    return wiring.open_for_serving(settings)


def create_app(
    settings: Settings,
    *,
    loader: Callable[[Settings], tuple] = default_loader,
    on_ready: Callable[[QueryService], Companion | None] | None = None,
) -> FastAPI:
    """The app; `loader(settings) -> (model, library)` runs in the lifespan (tests pass their own).

    `on_ready(service)` runs once the service is up (the CLI starts a watcher there, sharing
    the loaded model) and may return a `Companion`: stopped with the app, and asked for its
    health by /healthz (a watcher that died must not leave the server saying "ok").
    """
    metrics = Metrics()
    state = AppState(settings, metrics)
    files = FileReads(settings.file_workers, settings.file_read_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def load() -> None:
            try:
                model, library = await asyncio.to_thread(loader, settings)
                service = await asyncio.to_thread(wiring.query_service, settings, model, library, metrics)
                state.service = service
                log.info("ready: %d images", library.counts()[0])
                if on_ready is not None:
                    companion = await asyncio.to_thread(on_ready, service)
                    if companion is not None:
                        state.companions.append(companion)
            except SearchEngineError as e:
                state.error = str(e) if state.service is None else f"the watcher could not start: {e}"
                log.error("cannot start: %s", e)
            except Exception as e:  # the service stays up to say what is wrong
                what = f"{type(e).__name__}: {e}"
                state.error = what if state.service is None else f"the watcher could not start: {what}"
                log.exception("cannot start")

        task = asyncio.create_task(load())
        yield
        task.cancel()
        for companion in state.companions:
            await asyncio.to_thread(companion.stop)
        files.close()
        if state.service is not None:
            await state.service.close()
            state.service.library.close()

    app = FastAPI(
        title="searchengine",
        summary="Semantic image search on BLIP-2: ITC retrieval, ITM re-ranking.",
        version="0.1.0",
        lifespan=lifespan,
        dependencies=[Depends(_plain_text_parameters)],
        responses={
            400: {"model": ErrorOut, "description": "the request cannot be answered as it is; the message says what to fix"},
            401: {"model": ErrorOut, "description": "an API key is set on the server and was not sent"},
            503: {"model": ErrorOut, "description": "still loading, or the index cannot answer (the message says why)"},
        },
    )
    app.state.searchengine = state
    _install_middleware(app, settings, metrics)
    _install_error_handlers(app)

    web = _web_dir()
    app.mount("/static", StaticFiles(directory=web), name="static")

    @app.get("/", include_in_schema=False)
    def index():
        """The search page."""
        return FileResponse(web / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    @app.get("/healthz", response_model=HealthOut, responses={503: {"model": HealthOut}})
    def healthz(state: State):
        """Ready (200) once the model and the index are loaded; 503 while loading or broken."""
        problem = state.problem()
        if state.service is not None and problem is None:
            return HealthOut(status="ok")
        status = "error" if problem else "loading"
        return JSONResponse(HealthOut(status=status, error=problem).model_dump(), status_code=503)

    @app.get("/api/search", response_model=SearchOut, responses={400: {"model": ErrorOut}})
    async def search(
        service: Service,
        q: Annotated[str, Query(description="what to look for, in words", pattern=PLAIN_TEXT)],
        p: Paging,
        rerank: Annotated[bool, Query(description="re-rank the top candidates with the ITM head")] = True,
        mode: Annotated[
            Mode | None,
            Query(description="hybrid (default): semantic and keyword candidates fused, then ITM re-rank; "
                  "semantic: ITC then ITM only; keyword: captions and file/folder names only"),
        ] = None,
    ):
        """Text-to-image search. `"phrase"` and `-word` work in every mode; see `mode`."""
        mode_name = mode.value if mode is not None else settings.search_mode
        page = await service.search_text(
            q, k=p.k, offset=p.offset, rerank=rerank, min_score=p.min_score, filters=p.filters, mode=mode_name
        )
        return _search_out(page, p.k, p.offset, mode_name)

    @app.post("/api/search/image", response_model=SearchOut, responses={400: {"model": ErrorOut}, 413: {"model": ErrorOut}})
    async def search_image(
        service: Service,
        image: Annotated[UploadFile, File(description="the example image")],
        p: Paging,
    ):
        """Image-to-image search by an uploaded example (score: mean over query vectors of the best match)."""
        data = await _read_capped(image, settings.max_upload_bytes)
        page = await service.search_image(data, k=p.k, offset=p.offset, min_score=p.min_score, filters=p.filters)
        return _search_out(page, p.k, p.offset)

    @app.get("/api/images/{image_id}/similar", response_model=SearchOut, responses={404: {"model": ErrorOut}})
    async def similar(service: Service, image_id: ImageId, p: Paging):
        """Images most like an indexed one ("more like this"), itself left out."""
        page = await service.similar(image_id, k=p.k, offset=p.offset, min_score=p.min_score, filters=p.filters)
        return _search_out(page, p.k, p.offset)

    @app.get("/api/images/{image_id}", response_model=ImageOut, responses={404: {"model": ErrorOut}})
    def image(service: Service, image_id: ImageId):
        """An image's metadata and files."""
        d = service.image(image_id)
        return ImageOut(
            id=d["id"], paths=[f["path"] for f in d["files"]], files=[FileOut(path=f["path"], size=f["size"]) for f in d["files"]],
            width=d["width"], height=d["height"], taken_at=d["taken_at"], camera=d["camera"], gps_lat=d["gps_lat"],
            gps_lon=d["gps_lon"], caption=d["caption"], caption_model=d["caption_model"], caption_error=d["caption_error"],
            thumbnail_url=f"/api/images/{image_id}/thumbnail", preview_url=f"/api/images/{image_id}/preview",
            file_url=f"/api/images/{image_id}/file",
        )

    @app.get("/api/images/{image_id}/thumbnail", response_class=FileResponse, responses=FILE_RESPONSES)
    async def thumbnail(service: Service, image_id: ImageId):
        """A small JPEG of the image, made once and kept."""
        path = await files.run(service.thumbnail, image_id)
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

    @app.get("/api/images/{image_id}/preview", response_class=FileResponse, responses=FILE_RESPONSES)
    async def preview(service: Service, image_id: ImageId):
        """A screen-sized JPEG of the image (longest side `preview_size`, 1600 px), made on first request and kept."""
        path = await files.run(service.preview, image_id)
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

    @app.get("/api/images/{image_id}/file", response_class=FileResponse, responses=FILE_RESPONSES)
    async def original(service: Service, image_id: ImageId):
        """The original file, with its content type."""
        path = await files.run(service.file, image_id)
        media_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/folders", response_model=FoldersOut)
    async def folders(
        service: Service,
        q: Annotated[str, Query(max_length=1000, description="only folders whose path contains this, in any case")] = "",
        limit: Annotated[int, Query(ge=1, le=1000, description="at most this many folders")] = 50,
    ):
        """Indexed folders, subfolders included, with image counts (for the folder filter's suggestions)."""
        found, total = await asyncio.to_thread(service.folders, q, limit)
        return FoldersOut(folders=[FolderOut(path=f.path, images=f.images) for f in found], total=total)

    @app.get("/api/stats")
    def stats(service: Service, request: Request) -> dict:
        """Images, failures by reason, model, index type and sizes on disk.

        The server's own paths (its data directory, a model directory) are shown to callers
        that hold the API key, or, where no key is set, to callers on this machine; others get
        names only (`server_paths_hidden`). Failed files' paths are photo paths, shown as
        search hits show them."""
        service.refresh()
        described = service.library.describe()
        trusted = settings.api_key is not None or _loopback(request)
        if not trusted:
            described["data_dir"] = None
            if described["model"] and os.path.isabs(described["model"]):
                described["model"] = os.path.basename(described["model"].rstrip("/"))
        described["server_paths_hidden"] = not trusted
        return described

    @app.get("/metrics", response_class=Response)
    def prometheus(state: State):
        """Prometheus metrics: requests, latency per route and per search stage, index size."""
        if state.service is not None:
            state.service.update_gauges()
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


def _web_dir() -> FilePath:
    """The UI's files: the repo's web/ folder, installed as package data of `searchengine_web`."""
    spec = importlib.util.find_spec("searchengine_web")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the web UI files are missing: reinstall searchengine")
    return FilePath(list(spec.submodule_search_locations)[0])


async def _read_capped(upload: UploadFile, limit: int) -> bytes:
    chunks, total = [], 0
    while chunk := await upload.read(1 << 20):
        total += len(chunk)
        if total > limit:
            raise BadImageError("too_large", f"the upload is over the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _install_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    key = settings.api_key.get_secret_value() if settings.api_key else None
    # Inside the guard (added first): a refused upload is logged and counted like any answer.
    app.add_middleware(UploadLimit, limit=settings.max_upload_bytes, paths={"/api/search/image"})

    @app.middleware("http")
    async def guard_and_log(request: Request, call_next):
        start = time.perf_counter()
        # The page and its scripts hold no data; everything they fetch is guarded.
        public = request.url.path == "/" or request.url.path.startswith("/static/")
        if key is not None and request.method != "OPTIONS" and not public and not _authorised(request, key):
            response = JSONResponse(
                {"error": "an API key is needed: send it as the X-API-Key header (or ?api_key=)"}, status_code=401
            )
        else:
            try:
                response = await call_next(request)
            except Exception:  # a bug: answered here, so it is logged, counted, and the connection kept
                log.exception("unexpected error on %s %s", request.method, request.url.path)
                response = JSONResponse({"error": "internal error; the server log has the details"}, status_code=500)
        seconds = time.perf_counter() - start
        route = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.requests.labels(request.method, route, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(seconds)
        query = loggable_query(request.url.query)
        access_log.info(
            "%s %s%s %d %.1fms", request.method, request.url.path, f"?{query}" if query else "", response.status_code, seconds * 1000
        )
        return response

    if settings.cors_origins:  # added last, so it wraps the guard: preflights get their headers
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"], allow_headers=["X-API-Key", "Authorization"]
        )


def _loopback(request: Request) -> bool:
    """Whether the caller is on this machine (a loopback address or a Unix socket)."""
    if request.client is None:
        return True  # a Unix socket: only this machine can connect
    try:
        return ipaddress.ip_address(request.client.host).is_loopback
    except ValueError:
        return False


def _authorised(request: Request, key: str) -> bool:
    given = request.headers.get("x-api-key") or request.query_params.get("api_key") or ""
    auth = request.headers.get("authorization", "")
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:]
    return hmac.compare_digest(given.encode(), key.encode())


def _install_error_handlers(app: FastAPI) -> None:
    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(NotReady)
    async def not_ready(request, exc: NotReady):
        if exc.args and exc.args[0]:
            return error(503, f"the service could not start: {exc.args[0]}")
        return error(503, "the service is still loading the model; try again in a moment")

    def plain(status: int):
        async def handler(request, exc):
            return error(status, str(exc))

        return handler

    # The message of each is written for the user; the status says whose fault it is.
    for cls, status in ((ImageNotFoundError, 404), (QueryError, 400), (ModelMismatchError, 409), (SearchEngineError, 400)):
        app.add_exception_handler(cls, plain(status))

    app.add_exception_handler(FileTimeout, plain(504))

    @app.exception_handler(ServiceBusy)
    async def busy(request, exc: ServiceBusy):
        response = error(503, str(exc))
        response.headers["Retry-After"] = "2"
        return response
    for cls in (StoreDamagedError, StoreMissingError):  # the index cannot answer until it is restored
        app.add_exception_handler(cls, plain(503))

    @app.exception_handler(DatabaseError)
    async def database(request, exc: DatabaseError):
        if is_damage(exc):  # damaged under a running server: say so, rather than "internal error"
            log.error("the store is damaged: %s", damage(exc))
            return error(503, f"the index store is damaged ({damage(exc)}): `searchengine check` and `searchengine restore` repair it")
        log.exception("database error on %s %s", request.method, request.url.path)
        return error(500, "internal error; the server log has the details")

    @app.exception_handler(BadImageError)
    async def bad_image(request, exc: BadImageError):
        upload = request.url.path == "/api/search/image"
        if exc.reason == "too_large" and upload:
            return error(413, str(exc))
        if exc.reason == "vanished":
            return error(404, str(exc))
        if upload:
            return error(400, f"the upload is not a usable image: {exc}")
        # An indexed image whose file can no longer be read as one (changed or damaged on disk).
        return error(409, f"the image's file cannot be read any more ({exc}); re-index its folder")

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        problems = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ())[1:]) or "request"
            problems.append(f"{where}: {e.get('msg')}")
        return error(422, "; ".join(problems))

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):  # a bug: logged in full, answered in JSON
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error(500, "internal error; the server log has the details")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        response = error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})  # 405 carries Allow (RFC 9110)
        return response
