"""Shared set-up for the benchmarks: a real-size random model on disk, real photos."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "searchengine-bench"


def model_dir(size: str) -> Path:
    """A random model of `size` ('real': blip2-itm-vit-g's architecture), built once and kept."""
    from searchengine.random_models import build_tiny_model

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
