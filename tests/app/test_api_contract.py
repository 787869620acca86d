"""The API's contract: what the schema says is what the server does, bad requests are 4xx with
a reason, and nothing a client sends shows up where it should not (the key in the log).

The last test runs schemathesis over the whole OpenAPI schema with a bounded budget: every
generated request must get a documented status, a response that matches its schema, and
never a 5xx."""

from __future__ import annotations

import logging
import shutil
import socket
import time

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from searchengine.indexing.pipeline import Indexer
from searchengine.app.api import create_app
from searchengine.library import Library
from tests.helpers import wait_healthy


@pytest.fixture(scope="module")
def served(tmp_path_factory, photos_dir, tiny_model_dir, model):
    from searchengine.config.settings import Settings

    root = tmp_path_factory.mktemp("contract")
    photos = root / "photos"
    photos.mkdir()
    for f in sorted(photos_dir.rglob("*.jpg"))[:4]:
        shutil.copy(f, photos / f.name)
    settings = Settings(data_dir=root / "data", model=str(tiny_model_dir), device="cpu", dtype="float32",
                        refresh_interval_s=0, max_upload_bytes=200_000)
    library = Library.open(settings, create=True)
    Indexer(model, library, settings).run([photos])
    library.close()
    app = create_app(settings, loader=lambda s: (model, Library.open(s)))
    with TestClient(app) as client:
        wait_healthy(client)
        yield app, client, settings


def test_control_characters_are_refused_before_any_store_call(served):
    _, client, _ = served
    for params in ({"q": "dog", "folder": "a\x00b"}, {"q": "do\x00g"}, {"q": "dog", "mode": "keyword", "folder": "\x01"}):
        r = client.get("/api/search", params=params)
        assert r.status_code == 400 and "control character" in r.json()["error"], r.text


def test_ids_and_dates_are_read_strictly(served):
    _, client, _ = served
    assert client.get("/api/images/1").status_code == 200
    for bad in ("1_0", "+1", " 1", "1.0", "0x1"):
        r = client.get(f"/api/images/{bad}")
        assert r.status_code == 422 and "digits" in r.json()["error"], (bad, r.text)
    for bad in ("0.5", "1700000000", "yesterday", "2023-13"):
        r = client.get("/api/search", params={"q": "dog", "taken_after": bad})
        assert r.status_code == 422 and "YYYY-MM-DD" in r.json()["error"], (bad, r.text)
    assert client.get("/api/search", params={"q": "dog", "taken_after": "2023-06-01"}).status_code == 200
    assert client.get("/api/search", params={"q": "dog", "taken_after": "2023-06-01T14:30"}).status_code == 200


def test_405_names_the_allowed_methods(served):
    _, client, _ = served
    r = client.delete("/api/search", params={"q": "dog"})
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    r = client.get("/api/search/image")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


async def _post_raw(app, path: str, headers, chunks: list[bytes]) -> tuple[int, int]:
    """POST `chunks` straight at the ASGI app, as a server would: (how many body reads the app
    asked for, the status it answered)."""
    asked, sent = [], []

    async def receive():
        asked.append(1)
        return {"type": "http.request", "body": chunks.pop(0) if chunks else b"", "more_body": bool(chunks)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(),
             "query_string": b"", "headers": headers, "http_version": "1.1", "scheme": "http",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "root_path": "", "app": app}
    await app(scope, receive, send)
    return len(asked), next(m["status"] for m in sent if m["type"] == "http.response.start")


def post_raw(app, path: str, headers, chunks: list[bytes]) -> tuple[int, int]:
    import asyncio

    return asyncio.run(_post_raw(app, path, headers, chunks))


def test_an_oversized_upload_is_refused_without_reading_it(served):
    app, client, settings = served
    big = b"\xff\xd8" + b"\0" * (settings.max_upload_bytes * 3)
    r = client.post("/api/search/image", files={"image": ("big.jpg", big, "image/jpeg")})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]

    # Straight at the ASGI app, as a server would: a declared length over the cap is answered
    # before the first byte of the body is asked for; a chunked body is cut off at the cap.
    def call(headers, chunks):
        return post_raw(app, "/api/search/image", headers, chunks)

    boundary = b"x"
    declared = [(b"content-type", b"multipart/form-data; boundary=x"), (b"content-length", str(10**9).encode())]
    asked, status = call(declared, [b"never read"])
    assert status == 413 and asked == 0
    chunk = b"\0" * 65536
    body = [b"--x\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n"] + [chunk] * 100
    asked, status = call([(b"content-type", b"multipart/form-data; boundary=" + boundary)], body)
    assert status == 413 and asked < 10  # stopped near 200 kB + framing, not after 6.5 MB


def test_every_json_body_has_a_cap_too(served):
    """A 512 MiB {"question": ...} to /ask was read whole (RSS 495 -> 2,031 MiB, the event loop
    stalled 1.7 s) before a 422. Refused from its Content-Length, and cut off when chunked."""
    app, client, settings = served
    r = client.post("/api/images/1/ask", json={"question": "x" * (settings.max_body_bytes + 10)})
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"], r.text

    def ask(headers, chunks):
        return post_raw(app, "/api/images/1/ask", headers, chunks)

    json_type = (b"content-type", b"application/json")
    assert ask([json_type, (b"content-length", str(512 << 20).encode())], [b"never read"]) == (0, 413)
    asked, status = ask([json_type], [b'{"question": "'] + [b"x" * 65536] * 8192)  # 512 MiB, chunked
    assert status == 413 and asked < 40  # stopped past 1 MiB, not after 512


def test_an_unexpected_error_is_logged_counted_and_keeps_the_connection(served, monkeypatch, caplog):
    app, client, _ = served
    service = app.state.searchengine.service

    def broken(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(service, "image", broken)
    with caplog.at_level(logging.INFO, logger="searchengine"):
        r = client.get("/api/images/1")
    assert r.status_code == 500 and r.json() == {"error": "internal error; the server log has the details"}
    assert any("GET /api/images/1 500" in rec.getMessage() for rec in caplog.records)
    metrics = client.get("/metrics").text
    assert 'status="500"' in metrics
    monkeypatch.undo()
    assert client.get("/api/images/1").status_code == 200  # the client's next request is answered


def test_the_api_key_never_reaches_the_log(tmp_path, served, caplog):
    app, _, settings = served
    keyed = create_app(settings.model_copy(update={"api_key": SecretStr("s3cret")}),
                       loader=lambda s: (app.state.searchengine.service.model._model, Library.open(s)))
    with TestClient(keyed) as client, caplog.at_level(logging.INFO, logger="searchengine.access"):
        # misspelled or doubly encoded names too: from outside, api%255Fkey and api+key were logged
        for spelled in ("api_key", "api%5Fkey", "api%5fkey", "%61pi_key", "api_key+", "api%255Fkey", "api+key", "API-Key", "token"):
            client.get(f"/healthz?{spelled}=s3cret&x=1")
        client.get("/api/search?q=%1b%5b31mred%00")  # ESC [31m and NUL in a query
        client.get("/api/images/%1b%5b2J")  # and in a path
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "searchengine.access"]
    assert len(lines) == 11 and not any("s3cret" in line for line in lines), lines
    assert all("x=1" in line for line in lines[:9])  # the rest of the query is still logged
    assert not any(c in line for line in lines for c in ("\x1b", "\x00")), lines
    assert "%1b%5b31mred%00" in lines[-2] and "/api/images/\\x1b[2J" in lines[-1], lines[-2:]


def test_messages_say_what_is_wrong(served, tmp_path):
    _, client, settings = served
    for q in ('"', "!!!", '""', "   "):  # the schema says a query has a letter or digit: a 422 in words, not a regex
        r = client.get("/api/search", params={"q": q})
        assert r.status_code == 422 and r.json()["error"] == "q has no words to look for (only punctuation, spaces or quote marks); type some words", r.text
    r = client.post("/api/images/1/ask", json={"question": "  "})
    assert r.status_code == 422 and r.json()["error"] == "question is only spaces; write something", r.text
    r = client.post("/api/search/image", files={"image": ("empty.jpg", b"", "image/jpeg")})
    assert r.status_code == 400 and "the upload is empty" in r.json()["error"], r.text
    r = client.get("/api/search", params={"q": "-dog"})
    assert r.status_code == 400 and "only exclusions" in r.json()["error"]
    from tests.images import bomb_png

    r = client.post("/api/search/image", files={"image": ("bomb.png", bomb_png(20_000, 20_000), "image/png")})
    assert r.status_code == 413 and "--max-pixels" not in r.json()["error"] and "smaller image" in r.json()["error"]


@pytest.fixture(scope="module")
def over_http(served):
    """The API behind a real uvicorn on a free loopback port (a real client's view)."""
    import threading

    import httpx
    import uvicorn

    # An app of its own, started by uvicorn: its lifespan and everything asyncio in it (the
    # micro-batcher, the upload turns) belong to uvicorn's event loop, not the test client's.
    _, _, settings = served
    model = served[0].state.searchengine.service.model._model
    app = create_app(settings, loader=lambda s: (model, Library.open(s)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(base + "/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    yield base
    server.should_exit = True
    thread.join(timeout=10)


# The rules no schema can state: a request the schema calls valid may be answered 400 for one of
# these only, with this reason. Anything else a schema can say (an id's range, an empty or blank
# query, a control character, an empty upload) is in the schema, so a valid request that gets a
# 400 or a 422 fails the test; a folder filter that matches nothing is a 404 (what it names does
# not exist), as an unknown image id is.
SEMANTIC_RULES = {
    "only exclusions (-word)": "a query of nothing but -word exclusions",
    "is both liked and unliked": "the same image in like and unlike",
    "at most 50 example images": "like and unlike together over 50",
    "an example image's weight must be above 0": "a weight of 0 or over 10 in ID:WEIGHT",
    "an example image's id is a positive number": "ID 0 in ID:WEIGHT",
    "cancel out": "liked and unliked images whose vectors cancel",
    "taken_after is later than taken_before": "a date range the wrong way round",
    "characters long; the limit is": "a query over the server's max_query_chars",
    "not an image": "upload bytes that decode as no image",
    "cannot be read": "upload bytes that decode as no image",
    "smaller image": "an upload over the server's pixel limit",
    "has '..'": "a folder filter climbing out with ..",
}
ACCEPTED = (401, 403, 404, 409, 429)  # besides 2xx and 3xx: schemathesis's own list for valid requests


def rejected_valid_request(case, response) -> str | None:
    """Why a request the schema calls valid should not have been refused, or None."""
    if not case.meta.generation.mode.is_positive or response.status_code < 400 or response.status_code in ACCEPTED:
        return None
    if response.status_code >= 500:
        return None  # the server-error check speaks for these
    try:
        message = str(response.json().get("error", ""))
    except (ValueError, AttributeError):
        message = ""
    if response.status_code == 400:
        if any(rule in message for rule in SEMANTIC_RULES):
            return None
        if "the query is empty" in message and not case.query.get("like"):  # q may be empty only with like
            return None
    return f"valid request refused: {response.status_code} {message!r}"


@pytest.mark.slow  # end to end over HTTP: schemathesis against a live uvicorn, every operation
def test_the_schema_and_the_server_agree(over_http):
    """schemathesis over every operation: documented statuses and content types, bodies that
    match their schema, no 5xx, and every request the schema calls valid accepted unless a rule
    in SEMANTIC_RULES refuses it. Budget: 25 examples per operation, derandomized (the same run
    each time, seconds long)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import checks

    schema = schemathesis.openapi.from_url(over_http + "/openapi.json")
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()
        excluded = [checks.positive_data_acceptance]  # its stricter form is rejected_valid_request
        # Asking a photo where no model answers questions is a documented 503 with the reason
        # (this index's captioner is BLIP, not BLIP-2): a 5xx, because the request is fine and
        # the server is not set up for it. Any other 5xx still fails.
        unavailable_ok = operation.path in ("/api/images/{image_id}/ask", "/api/images/{image_id}/chat")
        if unavailable_ok:
            excluded.append(checks.not_a_server_error)

        @settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
        @given(operation.as_strategy())
        def check(case):
            response = case.call_and_validate(excluded_checks=excluded, timeout=120)  # a loaded CI machine is slow
            refused = rejected_valid_request(case, response)
            assert refused is None, f"{refused}; {case.method} {case.formatted_path} query={case.query} body={case.body!r:.200}"
            if unavailable_ok:
                assert response.status_code < 500 or (
                    response.status_code == 503 and "--vqa-model" in response.json()["error"]
                ), response.text

        try:
            check()
        except Exception as e:  # noqa: BLE001 - collect every operation's failure, then report them all
            failures.append(f"{operation.method.upper()} {operation.path}: {e}")
    assert not failures, "\n\n".join(failures)
