"""The real `searchengine serve` process on a free loopback port, queried over HTTP."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.server import EXE, env_for, get, running_server


def test_serve_answers_over_http(tmp_path, photo_files, tiny_model_dir):
    folder = tmp_path / "photos"
    folder.mkdir()
    for f in photo_files[:4]:
        (folder / f.name).write_bytes(f.read_bytes())
    env = env_for(tiny_model_dir, tmp_path / "data")
    subprocess.run([EXE, "index", str(folder)], env=env, check=True, capture_output=True, timeout=300)
    with running_server(env, tmp_path / "serve.log") as (base, log):
        status, body = get(f"{base}/api/search?q=a+yellow+flower&k=3")
        assert status == 200
        hits = json.loads(body)["hits"]
        assert len(hits) == 3 and all(Path(h["path"]).parent == folder for h in hits)
        status, thumb = get(base + hits[0]["thumbnail_url"])
        assert status == 200 and thumb[:2] == b"\xff\xd8"  # a JPEG
        status, body = get(f"{base}/api/search?q=")
        assert status == 400 and "empty" in json.loads(body)["error"]
        status, page = get(base + "/")
        assert status == 200 and b"/static/app.js" in page
    text = (tmp_path / "serve.log").read_text()
    assert "GET /api/search?q=a+yellow+flower&k=3 200" in text  # one line per request
    assert "Traceback" not in text
