"""Shared set-up for the benchmarks: a real-size random model on disk, real photos."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "searchengine-bench"
EXE = str(Path(sys.executable).with_name("searchengine"))


def model_dir(size: str) -> Path:
    """A random model of `size` ('real': blip2-itm-vit-g's architecture), built once and kept."""
    from searchengine.models.tiny import build_tiny_model

    path = CACHE / f"{size}-random"
    if not (path / "config.json").exists():
        t = time.perf_counter()
        build_tiny_model(path, size=size)
        print(f"built a {size} random model in {path} ({time.perf_counter() - t:.0f} s)")
    return path


def photos(n: int) -> list[Path]:
    folder = Path(subprocess.check_output(["bash", str(Path(__file__).parents[1] / "tests" / "fetch_photos.sh")], text=True).strip())
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".png"})
    return (files * (n // len(files) + 1))[:n]


def median_ms(fn, repeat: int) -> float:
    """Median milliseconds of `repeat` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(env: dict, port: int) -> subprocess.Popen:
    """`searchengine serve` on a loopback port, once /healthz answers 200."""
    proc = subprocess.Popen([EXE, "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the server did not become ready")
