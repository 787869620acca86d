"""`find_duplicates` at library scale, on synthetic BLIP-2-shaped vectors in a real SQLite store.

Each size is a store of n images (32 x 256-d float16 vectors, searchengine/vectors/synthetic.py),
1% of them near-duplicates of another image (its vectors plus noise, image-to-image score
~0.97). Printed: the time of each stage (reading every image's mean vector, the candidate
search over the means, scoring the proposed pairs), pairs scored, the planted pairs found
(recall) and groups that are not planted (false), and the ratio against comparing every pair,
whose cost is the per-pair time measured in the same run times n(n-1)/2.

    python benchmarks/duplicates.py --sizes 10000 100000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from searchengine.vectors import synthetic  # noqa: E402

Q, D = 32, 256
CHUNK = 2000


class StoreOnly:
    """The two calls find_duplicates makes, straight from the store (no vector index built)."""

    def __init__(self, store) -> None:
        self.store = store

    def indexed_ids(self) -> np.ndarray:
        return self.store.image_ids()

    def iter_vectors(self, ids):
        return self.store.iter_vectors(ids)


def fill(folder: Path, n: int, planted: int) -> None:
    from searchengine.media.imageio import ImageMeta
    from searchengine.store.records import NewImage
    from searchengine.store.records import ModelInfo
    from searchengine.store.writes import Store
    from searchengine.store.connection import sqlite_url

    gen = synthetic.Library.make(seed=2)
    store = Store.open(sqlite_url(folder / "store.db"))
    store.bind_model(ModelInfo("synthetic", "fp", Q, D, (1, 1)))
    have = len(store.image_ids())
    rng = np.random.default_rng(5)
    first = gen.images(0, min(CHUNK, n))  # the first chunk, as written below: the copies' sources
    assert planted <= len(first)
    t = time.perf_counter()
    for s0 in range(have, n, CHUNK):
        v = gen.images(s0, min(CHUNK, n - s0))
        for i in range(len(v)):  # the last `planted` images copy the first ones, lightly changed
            j = s0 + i
            if j >= n - planted:
                src = first[n - 1 - j]
                v[i] = synthetic.unit(src + rng.normal(0, 0.015, src.shape).astype(np.float32))
        store.write_batch(new_images=[NewImage(f"h{s0 + i}", ImageMeta(1, 1), v[i], None, b"", (f"/p/{s0 + i}.jpg", 1, 1)) for i in range(len(v))])
    if have < n:
        print(f"  filled a {n:,}-image store in {time.perf_counter() - t:.0f} s", flush=True)
    store.close()


def run(folder: Path, n: int) -> None:
    from searchengine.search.duplicates import find_duplicates
    from searchengine.search import image_similarity
    from searchengine.store.writes import Store
    from searchengine.store.connection import sqlite_url

    planted = n // 100
    data = folder / f"dups-{n}"
    data.mkdir(exist_ok=True)
    fill(data, n, planted)
    store = Store.open(sqlite_url(data / "store.db"))
    t = time.perf_counter()
    found = find_duplicates(StoreOnly(store), 0.95)
    total = time.perf_counter() - t
    want = {(i + 1, n - i) for i in range(planted)}  # ids are 1-based, in write order
    got = {tuple(sorted(g.ids)) for g in found.groups}
    hit = len(want & got)
    # Every pair instead: the per-pair score measured here, times n(n-1)/2.
    (_, a), = list(store.iter_vectors([1]))
    (_, b), = list(store.iter_vectors([2]))
    a, b = a[0].astype(np.float32), b[0].astype(np.float32)
    reps = 2000
    t = time.perf_counter()
    for _ in range(reps):
        0.5 * (image_similarity(a, b[None])[0] + image_similarity(b, a[None])[0])
    per_pair = (time.perf_counter() - t) / reps
    every = per_pair * n * (n - 1) / 2
    store.close()
    tm = found.timings_ms
    print(
        f"  {n:>9,} images: {total:6.1f} s (read {tm['read'] / 1000:.1f} s, candidates {tm['candidates'] / 1000:.1f} s, "
        f"score {tm['score'] / 1000:.1f} s); {found.pairs_scored:,} pairs scored; planted pairs found {hit}/{planted}, "
        f"other groups {len(got - want)}; every pair would take {every / 3600:.1f} h ({every / total:,.0f}x)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dir", type=Path, help="where the stores are kept (default: a temporary folder)")
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="dups-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"find_duplicates on synthetic stores in {folder}")
    for n in args.sizes:
        run(folder, n)


if __name__ == "__main__":
    main()
