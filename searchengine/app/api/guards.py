"""What the API refuses before any route runs, and how requests are told apart in the log.

- Every request body has a cap: an upload's is `max_upload_bytes`, every other route's
  `max_body_bytes` (a question, a JSON body). Over it a request is refused from its
  `Content-Length` at once, and a body that comes without one (chunked) is cut off at the
  cap: nothing past it is read, spooled or parsed (a 512 MiB `/ask` body was read whole).
- Control characters (NUL above all) in query parameters are a 400 before any store call.
- Image ids and dates are read strictly: `1_0` is not 10, `0.5` is not a date.
- No key reaches the access log, however its parameter name is spelt or percent-encoded
  (`api%255Fkey`, `api+key`, `token`: any name that reads as a key or secret); control
  characters in a logged request line are escaped.
- Every request (an unexpected error included) gets an access-log line and a metrics count.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import time
from datetime import date, datetime
from typing import Any
from urllib.parse import unquote_plus

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from searchengine.errors import QueryError
from searchengine.util.metrics import Metrics
from searchengine.config.settings import Settings

log = logging.getLogger("searchengine.app.api")
access_log = logging.getLogger("searchengine.access")

# Multipart framing around the file: boundary lines and part headers.
MULTIPART_SLACK = 64 * 1024

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
PLAIN_TEXT = r"^[^\x00-\x08\x0b-\x1f\x7f]*$"  # the schema's word for it: no control characters
# A query: empty (only where liked images stand in for words), or plain text with at least one
# letter or digit somewhere ("!!!", a lone quote mark or spaces say nothing to look for).
QUERY_TEXT = r"^$|^[^\x00-\x08\x0b-\x1f\x7f]*[^\W_][^\x00-\x08\x0b-\x1f\x7f]*$"
NOT_BLANK = r"\S"  # some character that is not a space
# What a parameter that does not match each pattern is told (pydantic would print the regex).
PATTERN_MEANS = {
    PLAIN_TEXT: "holds a control character; send plain text",
    NOT_BLANK: "is only spaces; write something",
    QUERY_TEXT: "has no words to look for (only punctuation, spaces or quote marks); type some words",
}
_DIGITS = re.compile(r"^[0-9]{1,19}$")
_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?(?:Z|[+-]\d{2}:?\d{2})?)?$")


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: every request body capped, uploads to `upload_paths` at `upload_limit`
    bytes (plus multipart framing), any other at `limit`."""

    def __init__(self, app, *, limit: int, upload_limit: int, upload_paths: set[str]) -> None:
        self.app = app
        self.limits = (limit, upload_limit)
        self.upload_paths = upload_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope["path"] in self.upload_paths
        limit = self.limits[upload]
        cap = limit + (MULTIPART_SLACK if upload else 0)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > cap):
            await self._refuse(send, limit, upload)
            return
        seen = 0
        exceeded = False
        started = False

        async def capped_receive():
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    exceeded = True
                    raise _TooLarge
            return message

        async def tracking_send(message) -> None:
            # The body parser may turn our stop into its own error answer (a 400): once the cap
            # was passed, the answer is ours.
            nonlocal started
            if exceeded:
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._refuse(send, limit, upload)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, capped_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send, limit, upload)

    @staticmethod
    async def _refuse(send, limit: int, upload: bool) -> None:
        what = "the upload is over the limit of {:,} bytes; send a smaller image" if upload else (
            "the request body is over the limit of {:,} bytes (max_body_bytes)")
        body = json.dumps({"error": what.format(limit)}).encode()
        await send({
            "type": "http.response.start", "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close")],
        })
        await send({"type": "http.response.body", "body": body})


def refuse_control_characters(params: Any) -> None:
    """QueryError (400) for a query parameter holding a control character such as NUL."""
    for name, value in params.multi_items():
        if _CONTROL.search(value) or _CONTROL.search(name):
            raise QueryError(f"the parameter {name!r} holds a control character; send plain text")


def strict_image_id(value: Any) -> Any:
    """An image id is written in plain digits: `1_0`, ` 10` and `+10` are refused, not read as 10."""
    if isinstance(value, str) and not _DIGITS.match(value):
        raise ValueError("an image id is a whole number written in digits, such as 42")
    return value


def strict_iso_date(value: Any) -> Any:
    """Dates as ISO text only (2023-06-01 or 2023-06-01T14:30): a bare number is not a date."""
    if value is None or isinstance(value, (date, datetime)):
        return value
    if not isinstance(value, str) or not _ISO.match(value.strip()):
        raise ValueError("write a date as YYYY-MM-DD or an ISO date-time such as 2023-06-01T14:30")
    return value


# A parameter whose name, decoded as often as it is encoded and with its separators dropped,
# reads as a credential: its value is never logged (api_key, api%255Fkey, api+key, API-Key, token).
_SECRET_NAME = re.compile(r"key|token|secret|passw|auth|credential|session", re.IGNORECASE)


def _decoded_name(name: str) -> str:
    for _ in range(4):  # %255F -> %5F -> _
        decoded = unquote_plus(name)
        if decoded == name:
            break
        name = decoded
    return re.sub(r"[\s_\-.+]", "", name)


def escape_control(text: str) -> str:
    """`text` with control characters (ESC, NUL, newlines) written as escapes, as `ls` shows
    names: a log line or a terminal gets no raw control character from a request or a file name."""
    return re.sub(r"[\x00-\x1f\x7f-\x9f]", lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def loggable_query(query: str) -> str:
    """The query string with the value of every key-like parameter left out, whatever escapes
    spell its name."""
    kept = []
    for part in query.split("&"):
        if not part:
            continue
        name = part.split("=", 1)[0]
        kept.append(f"{name}=***" if _SECRET_NAME.search(_decoded_name(name)) else part)
    return "&".join(kept)


def install(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    """The key check, the access log and the request metrics, around every route; the upload cap
    inside them; CORS outside, when origins are configured."""
    key = settings.api_key.get_secret_value() if settings.api_key else None
    # Inside the guard (added first): a refused body is logged and counted like any answer.
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, upload_limit=settings.max_upload_bytes,
                       upload_paths={"/api/search/image", "/api/explain"})

    @app.middleware("http")
    async def guard_and_log(request: Request, call_next):
        start = time.perf_counter()
        # The page and its scripts hold no data; everything they fetch is guarded.
        public = request.url.path == "/" or request.url.path.startswith("/static/")
        if key is not None and request.method != "OPTIONS" and not public and not authorised(request, key):
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
            "%s %s%s %d %.1fms", escape_control(request.method), escape_control(request.url.path),
            escape_control(f"?{query}") if query else "", response.status_code, seconds * 1000,
        )
        return response

    if settings.cors_origins:  # added last, so it wraps the guard: preflights get their headers
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"], allow_headers=["X-API-Key", "Authorization"]
        )


def loopback(request: Request) -> bool:
    """Whether the caller is on this machine (a loopback address or a Unix socket)."""
    if request.client is None:
        return True  # a Unix socket: only this machine can connect
    try:
        return ipaddress.ip_address(request.client.host).is_loopback
    except ValueError:
        return False


def authorised(request: Request, key: str) -> bool:
    given = request.headers.get("x-api-key") or request.query_params.get("api_key") or ""
    auth = request.headers.get("authorization", "")
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:]
    return hmac.compare_digest(given.encode(), key.encode())
