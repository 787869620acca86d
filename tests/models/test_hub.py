"""Where models come from: local directories, the hub cache, an unreachable hub, progress bars."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from searchengine.models import hub
from searchengine.errors import ModelLoadError


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    monkeypatch.setattr(hub, "_probe", None)  # each test probes its own endpoint


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


def test_a_local_directory_is_used_as_it_is(tiny_model_dir):
    where = hub.locate(str(tiny_model_dir))
    assert where.source == str(tiny_model_dir) and where.local_files_only


def test_a_missing_directory_is_one_clear_line():
    with pytest.raises(ModelLoadError, match="model directory '/no/such/dir' does not exist"):
        hub.locate("/no/such/dir")


def test_offline_and_not_cached_fails_at_once_with_the_ways_forward(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError) as e:
        hub.locate("someone/not-here")
    assert time.monotonic() - t0 < 2
    message = str(e.value)
    assert "HF_HUB_OFFLINE" in message and "--model DIR" in message and "make-tiny-model" in message
    assert ".." not in message and "\n" not in message


def test_an_unreachable_hub_fails_fast_naming_why_and_what_to_do(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError) as e:
        hub.locate("someone/not-here")
    assert time.monotonic() - t0 < 5  # one try, no retries with backoff (they took 35-40 s)
    message = str(e.value)
    assert "cannot download model 'someone/not-here'" in message and "cannot be reached" in message
    assert "--model DIR" in message and "make-tiny-model" in message
    with pytest.raises(ModelLoadError) as e:
        hub.locate("someone/captioner", "caption model")
    assert "--caption-model DIR" in str(e.value) and "--no-captions" in str(e.value)


def test_a_hub_that_never_answers_is_given_up_on_after_the_timeout():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # accepts connections (the backlog) and never says a word
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def hold() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        import os

        os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{server.getsockname()[1]}"
        t0 = time.monotonic()
        reason = hub.hub_unreachable_reason(timeout_s=0.5)
        assert reason is not None and time.monotonic() - t0 < 3
    finally:
        os.environ.pop("HF_ENDPOINT", None)
        stop.set()
        thread.join()
        for s in accepted:
            s.close()
        server.close()


def test_download_progress_shows_in_a_terminal_and_not_in_a_log():
    import huggingface_hub.utils as hub_utils

    class Terminal:
        def isatty(self) -> bool:
            return True

    class Log:
        def isatty(self) -> bool:
            return False

    try:
        # transformers' own switch turns the hub's bars off too; ours must turn them back on.
        assert hub.prepare_loading(Terminal()) is True
        assert not hub_utils.are_progress_bars_disabled()
        assert hub.prepare_loading(Log()) is False
        assert hub_utils.are_progress_bars_disabled()
    finally:
        hub_utils.disable_progress_bars()
