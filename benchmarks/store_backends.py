"""SQLite against PostgreSQL under the whole product, in one run: the same library (random ITC
vectors of the tiny model's shape, Zipf-like captions, 500 folders) written through
`Library.write_batch` on each backend, then queries through `Searcher.search` (the path of the
CLI and the API) in hybrid, keyword and semantic mode, without ITM (no ViT features here).

    python benchmarks/store_backends.py [--images 20000]

PostgreSQL is Debian's server, started here on a Unix socket with fsync off (tests/pg.py);
keyword_latency.py --postgres times the keyword side alone at 100k captions.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import median_ms, model_dir, quiet  # noqa: E402

QUERIES = ["a dog on the beach", "red car", "lighthouse at night", "w1234 photo", "beach -dog"]


def fill(library, model, n: int, seed: int) -> float:
    """Seconds spent in write_batch for n images, 500 a batch."""
    from searchengine.media.imageio import ImageMeta
    from searchengine.library import NewImage

    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(2000)]
    vocab[:8] = ["a", "photo", "of", "the", "dog", "beach", "red", "car"]
    vocab[1500] = "lighthouse"
    p = 1.0 / np.arange(1, len(vocab) + 1)
    p /= p.sum()
    seconds = 0.0
    for start in range(0, n, 500):
        batch = []
        for i in range(start, min(n, start + 500)):
            v = rng.standard_normal((model.num_query_tokens, model.embed_dim)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            caption = " ".join(rng.choice(vocab, size=rng.integers(8, 15), p=p))
            batch.append(NewImage(f"{i:064x}", ImageMeta(640, 480, caption=caption), v, None, b"",
                                  (f"/photos/folder{i % 500:03d}/IMG_{i:06d}.jpg", 1, 1)))
        t = time.perf_counter()
        library.write_batch(new=batch)
        seconds += time.perf_counter() - t
    library.save()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    quiet()
    from searchengine.library import Library, model_info
    from searchengine.models.retrieval import RetrievalModel
    from searchengine.search import Searcher
    from searchengine.config.settings import Settings
    from tests.pg import Server

    model = RetrievalModel.load(str(model_dir("tiny")), device="cpu", dtype="float32")
    server = Server()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            backends = {
                "SQLite": Settings(data_dir=Path(tmp) / "sqlite", model=str(model_dir("tiny")), backups=0),
                "PostgreSQL": Settings(data_dir=Path(tmp) / "pg", model=str(model_dir("tiny")), backups=0,
                                       database_url=server.new_database()),
            }
            searchers, writes = {}, {}
            for name, settings in backends.items():
                library = Library.open(settings, create=True)
                library.bind(model_info(model))
                library.add_root("/photos")
                writes[name] = fill(library, model, args.images, 0)
                searchers[name] = Searcher(model, library, settings)
                print(f"  filled {name}", flush=True)
            batches = max(1, args.images // 500)
            print(f"\n{args.images} images, tiny model ({model.num_query_tokens}x{model.embed_dim} vectors); 2 cores")
            a, b = writes["SQLite"], writes["PostgreSQL"]
            print(f"Library.write_batch of 500: SQLite {1e3 * a / batches:.0f} ms, PostgreSQL {1e3 * b / batches:.0f} ms "
                  f"(PostgreSQL/SQLite {b / a:.2f}x)")
            print(f"{'query':24s} {'mode':9s} {'SQLite ms':>10s} {'PG ms':>8s}  PG/SQLite  same top 10")
            for mode in ("hybrid", "keyword", "semantic"):
                for q in QUERIES:
                    run = {n: (lambda s=s: s.search(q, k=10, rerank=0, mode=mode)) for n, s in searchers.items()}
                    ms = {n: median_ms(f, args.repeat) for n, f in run.items()}
                    top = {n: [h.image_id for h in f().hits] for n, f in run.items()}
                    print(f"{q:24s} {mode:9s} {ms['SQLite']:10.1f} {ms['PostgreSQL']:8.1f}  "
                          f"{ms['PostgreSQL'] / ms['SQLite']:9.2f}  {top['SQLite'] == top['PostgreSQL']}")
            for s in searchers.values():
                s.library.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
