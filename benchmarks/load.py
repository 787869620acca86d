"""Load on `searchengine serve`: requests/s and p50/p99 at concurrency 1 and 16, with and
without the text micro-batcher, in one run. Loopback only; bounded in count and time.

    python benchmarks/load.py [--size real|tiny] [--requests 96] [--seconds 120]

Each arm starts its own server process on a free 127.0.0.1 port over the same index, with the
ranking cache off and a distinct query per request, so every request encodes its text.
`rerank=false`: what is measured is the path the batcher serves (encode + ANN); ITM re-ranking
is a per-query cost the batcher does not share.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import EXE, free_port, model_dir, photos, serve  # noqa: E402

WORDS = "dog cat beach sea flower tree sky city car road mountain snow red blue green yellow".split()


def query(i: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 4))


def load(port: int, concurrency: int, n: int, seconds: float) -> dict:
    def one(i: int) -> float:
        q = urllib.parse.urlencode({"q": query(i), "k": 10, "rerank": "false"})
        t = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/search?{q}", timeout=120) as r:
            json.loads(r.read())
        return time.perf_counter() - t

    stop = time.monotonic() + seconds
    latencies: list[float] = []
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for offset in range(0, n, concurrency):  # waves, so the time bound is checked often
            if time.monotonic() > stop:
                break
            latencies += pool.map(one, range(offset, min(n, offset + concurrency)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    pct = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000  # noqa: E731
    return {"n": len(latencies), "rps": len(latencies) / elapsed, "p50": pct(0.5), "p99": pct(0.99)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=["real", "tiny"], default="real")
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--seconds", type=float, default=120, help="time cap per arm and concurrency")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for f in photos(8):
            (folder / f.name).write_bytes(f.read_bytes())
        env = {**os.environ, "SEARCHENGINE_MODEL": str(model_dir(args.size)), "SEARCHENGINE_DATA_DIR": str(Path(tmp) / "data"),
               "SEARCHENGINE_RANKING_CACHE_SIZE": "0"}
        subprocess.run([EXE, "index", str(folder)], env=env, check=True, capture_output=True)
        results = {}
        for name, batch_max in [("no batcher", 1), ("micro-batcher", 16)]:
            port = free_port()
            proc = serve({**env, "SEARCHENGINE_TEXT_BATCH_MAX": str(batch_max)}, port)
            try:
                for c in (1, 16):
                    n = max(c * 2, args.requests // (4 if c == 1 else 1))
                    load(port, c, c, 30)  # warm-up
                    results[(name, c)] = r = load(port, c, n, args.seconds)
                    print(f"{args.size:4s} {name:13s} concurrency {c:2d}: {r['rps']:7.2f} req/s  p50 {r['p50']:8.1f} ms  p99 {r['p99']:8.1f} ms  ({r['n']} requests)", flush=True)
            finally:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=30)
        for c in (1, 16):
            ratio = results[("micro-batcher", c)]["rps"] / results[("no batcher", c)]["rps"]
            print(f"ratio micro-batcher / none at concurrency {c:2d}: {ratio:.2f}x requests/s")


if __name__ == "__main__":
    main()
