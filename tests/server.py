"""Start the real `searchengine serve` on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

EXE = str(Path(sys.executable).with_name("searchengine"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 30) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def env_for(model_dir: Path, data_dir: Path, caption_model: Path | None = None) -> dict:
    """The environment of a `searchengine` process; captions off unless a captioner is named."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SEARCHENGINE_MODEL": str(model_dir), "SEARCHENGINE_DATA_DIR": str(data_dir)}
    env.update({"SEARCHENGINE_CAPTION_MODEL": str(caption_model)} if caption_model else {"SEARCHENGINE_CAPTIONS": "false"})
    return env


@contextlib.contextmanager
def running_server(env: dict, log_path: Path, extra_args: list[str] | None = None):
    """Yield (base URL, log file) once /healthz is 200; stop the server with SIGINT after."""
    port = free_port()
    log = open(log_path, "w+")
    proc = subprocess.Popen(
        [EXE, "serve", "--port", str(port), *(extra_args or [])], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, open(log_path).read()
            try:
                if get(f"{base}/healthz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready: " + open(log_path).read()
            time.sleep(0.2)
        yield base, log
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
