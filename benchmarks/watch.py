"""The watcher: time from a file's arrival to it being searchable, and memory over churn.

    python benchmarks/watch.py [--size tiny|real] [--arrivals 10] [--churn 3000]

- Arrival latency: files copied in one at a time; the time until the image is in the FAISS
  index the watcher keeps (i.e. searchable), against the floor the settling rule sets (two
  looks, one debounce apart), in the same run.
- Memory: the watcher's process RSS after a warm-up churn, and after `--churn` more
  filesystem events (files created, then deleted, in waves), as a ratio.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import model_dir, photos, quiet  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def small_jpeg(seed: int) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def main() -> None:
    from searchengine.indexing.pipeline import Indexer
    from searchengine.indexing.watch import Watcher
    from searchengine.library import Library
    from searchengine.models.retrieval import RetrievalModel
    from searchengine.config.settings import Settings

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=["tiny", "real"], default="tiny")
    ap.add_argument("--arrivals", type=int, default=10)
    ap.add_argument("--churn", type=int, default=3000, help="filesystem events after the warm-up")
    ap.add_argument("--debounce", type=float, default=0.5)
    args = ap.parse_args()
    quiet()
    model = RetrievalModel.load(str(model_dir(args.size)), device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "lib"
        folder.mkdir()
        settings = Settings(data_dir=Path(tmp) / "data", model=str(model_dir(args.size)))
        library = Library.open(settings, create=True)
        watcher = Watcher(Indexer(model, library, settings), [folder], debounce_s=args.debounce)
        watcher.start()
        try:
            latencies = []
            for i, f in enumerate(photos(args.arrivals)):
                target = folder / f"arrival{i}{f.suffix}"
                shutil.copy(f, target)
                t = time.perf_counter()
                while library.store.file_state(str(target)) is None or len(library.index) < i + 1:
                    time.sleep(0.01)
                latencies.append(time.perf_counter() - t)
            floor = 2 * args.debounce
            print(f"{args.size} model, debounce {args.debounce} s, {args.arrivals} photos (mean of large JPEG/PNG)")
            print(f"arrival -> searchable: median {statistics.median(latencies):.2f} s, max {max(latencies):.2f} s; "
                  f"floor (two looks) {floor:.2f} s; median / floor = {statistics.median(latencies) / floor:.2f}x")

            def churn(events: int, seed: int) -> None:
                wave = 250  # each file: a create, a modify (the write) and a delete
                for start in range(0, events // 3, wave):
                    paths = [folder / f"churn{seed}-{start + j}.jpg" for j in range(wave)]
                    for j, p in enumerate(paths):
                        p.write_bytes(small_jpeg(seed * 100_000 + start + j))
                    _settle(watcher)
                    for p in paths:
                        p.unlink()
                    _settle(watcher)

            if args.churn <= 0:
                return
            churn(750, 1)  # warm-up: caches, allocator pools, SQLite pages
            before, fds_before = rss_mib(), len(os.listdir("/proc/self/fd"))
            t = time.perf_counter()
            churn(args.churn, 2)
            after, fds_after = rss_mib(), len(os.listdir("/proc/self/fd"))
            print(f"churn of {args.churn} events in {time.perf_counter() - t:.0f} s: RSS {before:.0f} MiB -> {after:.0f} MiB "
                  f"(ratio {after / before:.3f}); open files {fds_before} -> {fds_after}; "
                  f"{len(library.index)} images left (the {args.arrivals} arrivals)")
        finally:
            watcher.stop()
            library.close()


def _settle(watcher, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    time.sleep(0.2)
    while watcher.pending() and time.monotonic() < deadline:
        time.sleep(0.05)


if __name__ == "__main__":
    main()
