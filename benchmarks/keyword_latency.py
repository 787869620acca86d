"""The keyword side at library scale: FTS5 queries against a LIKE scan, and what keeping the
full-text index costs each store write, in one run.

    python benchmarks/keyword_latency.py [--images 100000]

A store is filled with `--images` images, each with a caption of 8 to 14 words drawn
Zipf-like from a 2,000-word vocabulary and a path in one of 500 folders (tiny vectors: only
the text side is measured here; benchmarks/query_latency.py times the vectors). Then:
- queries: `Store.keyword_search` (FTS5: match, BM25, share of words matched) for a rare
  word, a common word, three words, a phrase and an exclusion, against the baseline a first
  implementation would write: a `caption LIKE '%word%'` per word, summed, ranked by that count
  (the same ordering by words matched, by scanning every caption).
- writes: `write_batch` of 500 images at a time with the text index kept in step, against the
  same writes with the text index switched off (a no-op backend).
- with --postgres, the same store on a PostgreSQL server this script starts (Debian's server
  binaries, as the tests do): writes per batch and the same queries, against SQLite.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import median_ms  # noqa: E402


def fill(store, n: int, rng: np.random.Generator, vocab: list[str]) -> float:
    from searchengine.media.imageio import ImageMeta
    from searchengine.store.records import NewImage

    weights = 1.0 / np.arange(1, len(vocab) + 1)
    weights /= weights.sum()
    vec = np.zeros((2, 4), np.float32)
    seconds = 0.0
    for start in range(0, n, 500):
        batch = []
        for i in range(start, min(n, start + 500)):
            caption = " ".join(rng.choice(vocab, size=rng.integers(8, 15), p=weights))
            path = f"/photos/folder{i % 500:03d}/IMG_{i:06d}.jpg"
            batch.append(NewImage(f"{i:064x}", ImageMeta(640, 480, caption=caption), vec, None, b"", (path, 1, 1)))
        t = time.perf_counter()
        store.write_batch(new_images=batch)
        seconds += time.perf_counter() - t
    return seconds


def main() -> None:
    from sqlalchemy import Integer, cast, select
    from sqlalchemy import text as sql

    from searchengine.media.keywords import parse_query
    from searchengine.store.records import ModelInfo
    from searchengine.store.writes import Store
    from searchengine.store.schema import images
    from searchengine.store.connection import sqlite_url

    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--postgres", action="store_true",
                    help="also the same store on a PostgreSQL server started here (tests/pg.py): writes and queries side by side")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(2000)]
    vocab[:8] = ["a", "photo", "of", "the", "dog", "beach", "red", "car"]  # the most frequent ones
    vocab[1500] = "lighthouse"
    info = ModelInfo("bench", "x", 2, 4, (1, 1))
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(sqlite_url(Path(tmp) / "fts.db"))
        store.bind_model(info)
        store.add_root("/photos")
        with_text = fill(store, args.images, rng, vocab)
        plain = Store.open(sqlite_url(Path(tmp) / "plain.db"))
        plain._refresh_text = lambda conn, ids: None  # no path words, no text rows: the store as in version 1
        plain.bind_model(info)
        without_text = fill(plain, args.images, np.random.default_rng(0), vocab)
        print(f"{args.images} images; store writes of 500: {1e6 * without_text / args.images:.0f} us/image "
              f"without the text index, {1e6 * with_text / args.images:.0f} us/image with it "
              f"(ratio {with_text / without_text:.2f}x)")

        def like(text: str):
            # The same ranking by words matched, by scanning: a LIKE per word, summed.
            q = parse_query(text)
            matched = sum(cast(images.c.caption.like(f"%{' '.join(c)}%"), Integer) for c in q.clauses)
            sel = select(images.c.id, matched.label("n")).where(matched > 0)
            for c in q.excluded:
                sel = sel.where(~images.c.caption.like(f"%{' '.join(c)}%"))
            with store.engine.connect() as conn:
                return list(conn.execute(sel.order_by(matched.desc(), images.c.id).limit(128)).scalars())

        print(f"{'query':28s} {'matches':>8s} {'fts5 ms':>8s} {'LIKE ms':>8s}  ratio")
        for text in ["lighthouse", "dog", "red car beach", '"red car"', "beach -dog", "w1234 w1777"]:
            q = parse_query(text)
            with store.engine.connect() as conn:
                matches = conn.execute(sql("SELECT count(*) FROM image_text WHERE image_text MATCH :q"),
                                       {"q": store.text._match(q)}).scalar()
            fts = median_ms(lambda: store.keyword_search(q, 128), 5)
            scan = median_ms(lambda: like(text), 5)
            print(f"{text:28s} {matches:8d} {fts:8.1f} {scan:8.1f}  {scan / fts:5.1f}x")
        if args.postgres:
            postgres_side(store, args.images, vocab, info)
        store.close()
        plain.close()


def postgres_side(sqlite_store, n: int, vocab: list[str], info) -> None:
    """The same images in a PostgreSQL store: write time per batch of 500 and keyword query
    latency, each against SQLite's in this run."""
    from searchengine.media.keywords import parse_query
    from searchengine.store.writes import Store
    from tests.pg import Server

    server = Server()
    try:
        pg = Store.open(server.new_database())
        pg.bind_model(info)
        pg.add_root("/photos")
        seconds = fill(pg, n, np.random.default_rng(0), vocab)
        lite = Store.open(str(sqlite_store.engine.url).replace("fts.db", "fts-again.db"))
        lite.bind_model(info)
        lite.add_root("/photos")
        lite_seconds = fill(lite, n, np.random.default_rng(0), vocab)
        batches = max(1, n // 500)
        print(f"\nPostgreSQL {server.bin.parent.name} (Unix socket, fsync off) against SQLite (WAL), {n} images:")
        print(f"store write of 500 images: SQLite {1e3 * lite_seconds / batches:.0f} ms, PostgreSQL {1e3 * seconds / batches:.0f} ms "
              f"(ratio {seconds / lite_seconds:.2f}x)")
        # The same images match on both; their order within one coverage differs (BM25 against ts_rank).
        print(f"{'query':28s} {'SQLite ms':>10s} {'PG ms':>8s}  PG/SQLite  same matches")
        for text in ["lighthouse", "dog", "red car beach", '"red car"', "beach -dog", "w1234 w1777"]:
            q = parse_query(text)
            a = median_ms(lambda: lite.keyword_search(q, 128), 5)
            b = median_ms(lambda: pg.keyword_search(q, 128), 5)
            every = lambda store: {(h.image_id, round(h.coverage, 6)) for h in store.keyword_search(q, n)}
            same = every(lite) == every(pg)
            print(f"{text:28s} {a:10.1f} {b:8.1f}  {b / a:9.2f}  {same}")
        pg.close()
        lite.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
