"""Errors become HTTP answers by their type: one table, the most specific class winning."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from searchengine.app.api import errors
from searchengine.errors import (
    BadImageError,
    ImageNotFoundError,
    IndexedFileError,
    IndexedFileGone,
    QueryError,
    SearchEngineError,
    StoreDamagedError,
    UploadError,
    UploadTooLarge,
)
from searchengine.service import ServiceBusy

CASES = [
    (QueryError("the query is empty"), 400),
    (UploadError("the upload is not a usable image: not an image"), 400),
    (UploadTooLarge("the upload is over the limit"), 413),
    (ImageNotFoundError("no image has id 9"), 404),
    (IndexedFileGone("image 3: it has no file left"), 404),
    (IndexedFileError("the image's file cannot be read any more"), 409),
    (ServiceBusy("too many uploads"), 503),
    (StoreDamagedError("the store is damaged"), 503),
    (errors.FileReadTimeout("reading took over 15 s"), 504),
    (errors.NotReady(None), 503),
    (SearchEngineError("something the user can fix"), 400),
    (BadImageError("decode_error", "broken"), 400),
    (RuntimeError("a bug"), 500),
]


@pytest.fixture(scope="module")
def client():
    app = FastAPI()
    errors.install(app)

    @app.get("/raise/{i}")
    def raise_it(i: int):
        raise CASES[i][0]

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("i", range(len(CASES)))
def test_each_error_type_has_its_status_and_keeps_its_message(client, i):
    exc, status = CASES[i]
    r = client.get(f"/raise/{i}")
    assert r.status_code == status, (exc, r.text)
    if status != 500 and not isinstance(exc, errors.NotReady):
        assert r.json() == {"error": str(exc)}
    if isinstance(exc, ServiceBusy):
        assert r.headers["retry-after"] == "2"
