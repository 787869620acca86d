"""How errors become HTTP answers: by exception type, one table.

Every message is written for the user; the status says whose fault it is. An error raised in a
route is looked up here by its class (the most specific entry wins, as Starlette looks up
handlers along the class's MRO), never by the text of its reason.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from searchengine.errors import (
    FileReadTimeout,
    NotReady,
    ServiceBusy,
    VqaUnavailable,
    BadImageError,
    FolderNotFoundError,
    ImageNotFoundError,
    IndexBusyError,
    IndexedFileError,
    IndexedFileGone,
    ModelMismatchError,
    QueryError,
    SearchEngineError,
    StoreDamagedError,
    StoreMissingError,
    UploadError,
    UploadTooLarge,
)
from searchengine.app.api.guards import PATTERN_MEANS
from searchengine.store.connection import damage, is_damage, is_unreachable

log = logging.getLogger("searchengine.app.api")


STATUS: dict[type[BaseException], int] = {
    SearchEngineError: 400,  # the request cannot be answered as it is; the message says what to fix
    QueryError: 400,
    UploadError: 400,  # the upload is not a usable image
    UploadTooLarge: 413,
    BadImageError: 400,
    ImageNotFoundError: 404,
    FolderNotFoundError: 404,  # a folder filter names no indexed folder
    IndexedFileGone: 404,  # the image's file is gone or changed since it was indexed
    IndexedFileError: 409,  # the file is there, but no longer readable as an image: re-index
    ModelMismatchError: 409,
    FileReadTimeout: 504,
    ServiceBusy: 503,  # with Retry-After
    VqaUnavailable: 503,  # no model here answers questions about photos
    IndexBusyError: 503,
    StoreDamagedError: 503,  # the index cannot answer until it is restored
    StoreMissingError: 503,
}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def install(app: FastAPI) -> None:
    """Register the table's handlers and those that need more than a status."""

    def by_table(status: int):
        async def handler(request, exc):
            response = _error(status, str(exc))
            if isinstance(exc, ServiceBusy):
                response.headers["Retry-After"] = "2"
            return response

        return handler

    for cls, status in STATUS.items():
        app.add_exception_handler(cls, by_table(status))

    @app.exception_handler(NotReady)
    async def not_ready(request, exc: NotReady):
        if exc.args and exc.args[0]:
            return _error(503, f"the service could not start: {exc.args[0]}")
        return _error(503, "the service is still loading the model; try again in a moment")

    @app.exception_handler(DBAPIError)
    async def database(request, exc: DBAPIError):
        if is_damage(exc):  # damaged under a running server: say so, rather than "internal error"
            log.error("the store is damaged: %s", damage(exc))
            return _error(503, f"the index store is damaged ({damage(exc)}): `searchengine check` and `searchengine restore` repair it")
        if is_unreachable(exc):  # PostgreSQL down or restarting: a 503 to retry, as /healthz says
            log.error("the index store cannot be reached: %s", damage(exc))
            response = _error(503, f"the index store cannot be reached ({damage(exc)}); try again in a moment")
            response.headers["Retry-After"] = "2"
            return response
        log.exception("database error on %s %s", request.method, request.url.path)
        return _error(500, "internal error; the server log has the details")

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        problems = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ())[1:]) or "request"
            means = PATTERN_MEANS.get((e.get("ctx") or {}).get("pattern")) if e.get("type") == "string_pattern_mismatch" else None
            problems.append(f"{where} {means}" if means else f"{where}: {e.get('msg')}")
        return _error(422, "; ".join(problems))

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):  # a bug: logged in full, answered in JSON
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, "internal error; the server log has the details")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        response = _error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})  # 405 carries Allow (RFC 9110)
        return response
