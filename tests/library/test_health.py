"""/healthz tells the truth once the service is up: a watcher that failed to start or stopped
working, or a damaged store, is a 503 with the reason, not "ok"."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from searchengine.app.api import create_app
from searchengine.library import Library


class FakeWatch:
    def __init__(self) -> None:
        self.problem: str | None = None
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True

    def health(self) -> str | None:
        return self.problem


def wait_ready(client) -> None:
    for _ in range(200):
        if client.get("/healthz").json()["status"] != "loading":
            return
        time.sleep(0.05)


@pytest.fixture
def loader(settings, model):
    Library.open(settings, create=True).close()
    return lambda s: (model, Library.open(s))


def test_a_companion_that_stops_working_makes_healthz_say_so(settings, loader):
    watch = FakeWatch()
    with TestClient(create_app(settings, loader=loader, on_ready=lambda service: watch)) as client:
        wait_ready(client)
        assert client.get("/healthz").status_code == 200
        watch.problem = "the watcher has stopped: new photos are not indexed"
        r = client.get("/healthz")
        assert r.status_code == 503 and r.json() == {"status": "error", "error": watch.problem}
    assert watch.stopped


def test_a_watcher_that_cannot_start_is_reported(settings, loader):
    def on_ready(service):
        raise UnicodeEncodeError("utf-8", "bad\udcff.jpg", 3, 4, "surrogates not allowed")

    with TestClient(create_app(settings, loader=loader, on_ready=on_ready)) as client:
        wait_ready(client)
        r = client.get("/healthz")
        assert r.status_code == 503 and r.json()["error"].startswith("the watcher could not start")
