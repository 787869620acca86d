"""What the API refuses before any route runs, and how requests are told apart in the log.

- Uploads over the cap are refused from their `Content-Length` at once, and a body that
  comes without one (chunked) is cut off at the cap: nothing past it is read or spooled.
- Control characters (NUL above all) in query parameters are a 400 before any store call.
- Image ids and dates are read strictly: `1_0` is not 10, `0.5` is not a date.
- The API key never reaches the access log, however its parameter name is percent-encoded.
"""

from __future__ import annotations

import json
import re
from datetime import date, datetime
from typing import Any
from urllib.parse import unquote_plus

from searchengine.errors import QueryError

# Multipart framing around the file: boundary lines and part headers.
MULTIPART_SLACK = 64 * 1024

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
PLAIN_TEXT = r"^[^\x00-\x08\x0b-\x1f\x7f]*$"  # the schema's word for it: no control characters
_DIGITS = re.compile(r"^[0-9]{1,19}$")
_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?(?:Z|[+-]\d{2}:?\d{2})?)?$")


class _TooLarge(Exception):
    pass


class UploadLimit:
    """ASGI middleware: POST bodies to `paths` capped at `limit` bytes (plus multipart framing)."""

    def __init__(self, app, *, limit: int, paths: set[str]) -> None:
        self.app = app
        self.cap = limit + MULTIPART_SLACK
        self.limit = limit
        self.paths = paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.cap):
            await self._refuse(send)
            return
        seen = 0
        exceeded = False
        started = False

        async def capped_receive():
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.cap:
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
                    await self._refuse(send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, capped_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = json.dumps({"error": f"the upload is over the limit of {self.limit:,} bytes; send a smaller image"}).encode()
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


def loggable_query(query: str) -> str:
    """The query string without the API key, whatever escapes spell its name."""
    kept = []
    for part in query.split("&"):
        if not part:
            continue
        name = unquote_plus(part.split("=", 1)[0])
        if name.strip().lower() == "api_key":
            continue
        kept.append(part)
    return "&".join(kept)
