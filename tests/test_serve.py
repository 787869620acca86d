"""The real `searchengine serve` process on a free loopback port, queried over HTTP."""

from __future__ import annotations

import json
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


def get(url: str, timeout: float = 30):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_serve_answers_over_http(tmp_path, photo_files, tiny_model_dir):
    folder = tmp_path / "photos"
    folder.mkdir()
    for f in photo_files[:4]:
        (folder / f.name).write_bytes(f.read_bytes())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SEARCHENGINE_MODEL": str(tiny_model_dir),
           "SEARCHENGINE_DATA_DIR": str(tmp_path / "data")}
    subprocess.run([EXE, "index", str(folder)], env=env, check=True, capture_output=True, timeout=300)
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([EXE, "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline:
            try:
                status, _ = get(f"{base}/healthz", timeout=2)
                if status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, open(tmp_path / "serve.log").read()
            time.sleep(0.2)
        assert status == 200
        status, body = get(f"{base}/api/search?q=a+yellow+flower&k=3")
        assert status == 200
        hits = json.loads(body)["hits"]
        assert len(hits) == 3 and all(Path(h["path"]).parent == folder for h in hits)
        status, thumb = get(base + hits[0]["thumbnail_url"])
        assert status == 200 and thumb[:2] == b"\xff\xd8"  # a JPEG
        status, body = get(f"{base}/api/search?q=")
        assert status == 400 and "empty" in json.loads(body)["error"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    log.seek(0)
    text = log.read()
    assert "GET /api/search?q=a+yellow+flower&k=3 200" in text  # one line per request
    assert "Traceback" not in text
