"""Indexing speed and query latency of two source trees (before and after a change), in one run.

    git worktree add /tmp/before <commit>
    python benchmarks/compare_trees.py /tmp/before . [--size tiny] [-n 48] [--repeat 3]

Each measurement runs in a fresh process with the tree first on the path, the two trees
alternating (this machine is shared and noisy): indexing `-n` real photos with the pipeline
(images/s), then fresh text queries of each mode through the service's path (median ms, see
benchmarks/query_sql.py). Prints the median of each tree and the ratio after / before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import asyncio, json, re, shutil, statistics, sys, tempfile, time
from pathlib import Path
sys.path.append(sys.argv[1])  # benchmarks.common; the tree under test comes first (cwd)
from benchmarks.common import model_dir, photos, quiet
quiet()
try:  # the layout since the redesign (issue 28): one import root, a request checked once
    from searchengine.config.settings import Settings
    from searchengine.indexing.pipeline import Indexer
    from searchengine.models.retrieval import RetrievalModel
    from searchengine.search import SearchRequest
    from searchengine.service import QueryService

    def text_query(service, settings, q, mode):
        return service.search_text(SearchRequest.checked(q, settings, k=10, mode=mode))
except ImportError:  # before it
    from indexer.pipeline import Indexer
    from searchengine.models import RetrievalModel
    from searchengine.queries import Filters
    from searchengine.serving import QueryService
    from searchengine.settings import Settings

    def text_query(service, settings, q, mode):
        return service.search_text(q, k=10, offset=0, rerank=True, min_score=None, filters=Filters(), mode=mode)
from searchengine.library import Library

size, n = sys.argv[2], int(sys.argv[3])
with tempfile.TemporaryDirectory() as tmp:
    folder = Path(tmp) / "photos"
    folder.mkdir()
    words = []
    for i, f in enumerate(photos(n)):
        (folder / f"{i:04d}_{f.name}").write_bytes(f.read_bytes() + b"\0" * i)
        words += [w.lower() for w in re.split(r"[^A-Za-z]+", f.stem) if len(w) > 3]
    words = sorted(set(words))
    settings = Settings(data_dir=Path(tmp) / "data", model=str(model_dir(size)), captions=False, refresh_interval_s=3600)
    model = RetrievalModel.load(settings.model, device="cpu")
    library = Library.open(settings, create=True)
    t = time.perf_counter()
    Indexer(model, library, settings).run([folder])
    out = {"index images/s": n / (time.perf_counter() - t)}
    service = QueryService(settings, model, library)
    for mode in ("semantic", "hybrid", "keyword"):
        times = []
        for r in range(8):
            q = f"a photo of {words[(7 * r) % len(words)]} {mode}"
            t = time.perf_counter()
            asyncio.run(text_query(service, settings, q, mode))
            times.append((time.perf_counter() - t) * 1000)
        out[f"{mode} query ms"] = statistics.median(times[1:])
    library.close()
print(json.dumps(out))
"""


def measure(tree: Path, size: str, n: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), size, str(n)], env=env, check=True,
                         capture_output=True, text=True, cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--size", choices=["tiny", "real"], default="tiny")
    ap.add_argument("-n", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    results: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for _ in range(args.repeat):
        for name, tree in (("before", args.before), ("after", args.after)):
            results[name].append(measure(tree.resolve(), args.size, args.n))
    print(f"{args.n} photos, {args.size} model, {args.repeat} runs of each tree, alternated; medians")
    for key in results["before"][0]:
        b = statistics.median(r[key] for r in results["before"])
        a = statistics.median(r[key] for r in results["after"])
        print(f"{key:18s} before {b:9.2f}   after {a:9.2f}   after/before {a / b:5.2f}")


if __name__ == "__main__":
    main()
