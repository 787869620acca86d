"""The vector index's tiers at 100k and 1M images (issue 11): recall against exact max-sim,
query latency alone and at 16 at once, build time, memory and bytes per image.

Synthetic but BLIP-2-shaped vectors (32 x 256-d per image, from searchengine/vectors/synthetic.py:
1,000 topics, image centres near a topic, vectors near their image's centre; queries near
held-out image centres). The vectors live in a float16 memory-mapped file, as the store keeps
them (float16), so that 1M images (16 GB) fit on this machine.

For each size it prints, in one run:
- exact: the exact tier (FAISS flat, float32 in RAM) where it fits in RAM, else the exact
  scan of the float16 vectors in numpy (what ground truth costs);
- ann: `ann.build` with the product's defaults (nprobe and overfetch tuned at build time), candidates
  re-scored exactly from the float16 vectors, as `Library.search_vectors` does;
- with --store N: `Library.search_vectors` itself on an N-image store, both tiers, where the
  candidates' vectors are read from SQLite (16 KiB a row).

    python benchmarks/ann.py --sizes 100000 1000000 [--store 100000]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from searchengine.vectors import ann
from searchengine.vectors import synthetic  # noqa: E402
from searchengine.config.settings import Settings  # noqa: E402

Q, D = 32, 256
CHUNK = 5000


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def vectors(n: int, folder: Path, lib: synthetic.Library) -> np.memmap:
    path = folder / f"vectors-{n}.f16"
    if not path.exists() or path.stat().st_size != n * Q * D * 2:
        t = time.perf_counter()
        m = np.memmap(path.with_suffix(".tmp"), dtype=np.float16, mode="w+", shape=(n, Q, D))
        for s in range(0, n, CHUNK):
            m[s:s + CHUNK] = lib.images(s, min(CHUNK, n - s))
        m.flush()
        del m
        os.replace(path.with_suffix(".tmp"), path)
        print(f"  generated {n} images in {time.perf_counter() - t:.0f} s", flush=True)
    return np.memmap(path, dtype=np.float16, mode="r", shape=(n, Q, D))


def exact_top(vecs: np.memmap, queries: np.ndarray, k: int) -> list[np.ndarray]:
    best = ann.TopK(len(queries), k)
    for s in range(0, len(vecs), CHUNK):
        chunk = np.asarray(vecs[s:s + CHUNK], dtype=np.float32)
        best.push(np.arange(s, s + len(chunk)), ann.max_sim(chunk, queries))
    return best.ids()


def latencies(search, queries: np.ndarray, threads: int) -> tuple[float, float]:
    def one(q):
        t = time.perf_counter()
        search(q)
        return (time.perf_counter() - t) * 1000

    if threads == 1:
        times = [one(q) for q in queries]
    else:
        with ThreadPoolExecutor(threads) as pool:
            times = list(pool.map(one, np.concatenate([queries] * 2)))
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def recall(found: list[np.ndarray], truth: list[np.ndarray], k: int) -> float:
    return float(np.mean([len(np.intersect1d(f[:k], t[:k])) / k for f, t in zip(found, truth)]))


def run_size(n: int, folder: Path, depth: int, n_queries: int) -> None:
    print(f"\n== {n:,} images ({n * Q:,} vectors) ==", flush=True)
    lib = synthetic.Library.make(seed=1)
    vecs = vectors(n, folder, lib)
    queries = lib.queries(n_queries)
    t = time.perf_counter()
    truth = exact_top(vecs, queries, 100)
    scan_s = (time.perf_counter() - t) / n_queries
    # How neighbourhoods look: the 1st, 10th and 100th best exact scores, averaged.
    first = np.asarray(vecs[: min(n, 20000)], np.float32)
    s = np.sort(ann.max_sim(first, queries[:10]), axis=0)[::-1]
    print(f"  exact scores of the 1st/10th/100th best (first 20k images): {s[0].mean():.3f} / {s[9].mean():.3f} / {s[99].mean():.3f}")
    ids = np.arange(n, dtype=np.int64)

    def read(wanted=None):
        if wanted is None:
            for s0 in range(0, n, CHUNK):
                yield ids[s0:s0 + CHUNK], np.asarray(vecs[s0:s0 + CHUNK], np.float32)
        else:
            w = np.asarray(wanted)
            yield w, np.asarray(vecs[w], np.float32)

    def rescore(index, qs, k, allowed):
        proposed = index.search(qs, k * index.params.overfetch, allowed)
        out = []
        for q, c in zip(qs, proposed):
            sc = ann.max_sim(np.asarray(vecs[np.sort(c.ids)], np.float32), q[None])[:, 0]
            cid = np.sort(c.ids)
            o = np.lexsort((cid, -sc))[:k]
            out.append(ann.Candidates(cid[o], sc[o]))
        return out

    rows = []
    exact_ram = n * Q * (D * 4 + 8)
    if exact_ram < 0.6 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"):
        from searchengine.vectors.exact import VectorIndex

        before = rss_gib()
        t = time.perf_counter()
        flat = VectorIndex(D, Q)
        for got, v in read():
            flat.add(got, v)
        build = time.perf_counter() - t
        found = [flat.search(q[None], depth)[0].ids for q in queries]
        p50, p99 = latencies(lambda q: flat.search(q[None], depth), queries[:20], 1)
        c50, c99 = latencies(lambda q: flat.search(q[None], depth), queries[:20], 16)
        rows.append(("exact (flat)", recall(found, truth, 10), recall(found, truth, 100), p50, p99, c50, c99, build,
                     rss_gib() - before, exact_ram / n))
        del flat
    else:
        # Ground truth's cost: 100 queries at once over the float16 vectors, per query.
        rows.append(("exact (numpy, batch of 100)", 1.0, 1.0, scan_s * 1000, float("nan"), float("nan"), float("nan"), 0.0, 0.0, float("nan")))
        print(f"  the exact tier would hold {exact_ram / 2**30:.0f} GiB in RAM: not built; exact scan {scan_s:.1f} s a query")

    s = Settings()
    config = ann.BuildConfig(s.ann_factory, s.ann_reps, s.ann_overfetch, s.ann_nprobe, s.ann_target_recall, depth, s.ann_target_recall_deep)
    before = rss_gib()
    t = time.perf_counter()
    index = ann.build(ids, read=read, rescore=rescore, config=config, dim=D, num_vectors=Q)
    build = time.perf_counter() - t
    grown = rss_gib() - before
    found = [c.ids for c in rescore(index, queries, depth, None)]
    search = lambda q: rescore(index, q[None], depth, None)  # noqa: E731
    p50, p99 = latencies(search, queries, 1)
    c50, c99 = latencies(search, queries, 16)
    rows.append((f"ann {index.params.factory} r{index.params.reps} np{index.params.nprobe} x{index.params.overfetch}", recall(found, truth, 10),
                 recall(found, truth, 100), p50, p99, c50, c99, build, grown, index.bytes_per_image()))
    path = folder / "ann.faiss"
    index.save(path)
    on_disk = path.stat().st_size / n
    path.unlink()
    print(f"  ann: build-time recall@10 {index.params.recall_at_10} (nprobe {index.params.nprobe}, overfetch {index.params.overfetch}); "
          f"file {on_disk:.0f} B/image; store float16 vectors {Q * D * 2} B/image")
    print(f"  {'tier':34s} {'R@10':>6s} {'R@100':>6s} {'p50':>7s} {'p99':>7s} {'p50x16':>7s} {'p99x16':>7s} {'build':>7s} {'+RSS':>6s} {'RAM/img':>8s}")
    for name, r10, r100, p50, p99, c50, c99, b, g, per in rows:
        print(f"  {name:34s} {r10:6.3f} {r100:6.3f} {p50:6.1f}ms {p99:6.1f}ms {c50:6.1f}ms {c99:6.1f}ms {b:6.0f}s {g:5.1f}G {per:7.0f}B")
    if rows[0][0] == "exact (flat)":
        print(f"  ann p50 speed-up against exact: {rows[0][3] / rows[1][3]:.1f}x")
    print(f"  peak RSS so far {peak_gib():.1f} GiB", flush=True)


def product_path(folder: Path, n: int, depth: int, n_queries: int) -> None:
    """`Library.search_vectors` itself on an n-image store, approximate tier against exact
    tier: re-scoring reads the candidates' float16 vectors from SQLite (16 KiB a row)."""
    from searchengine.media.imageio import ImageMeta
    from searchengine.store.records import NewImage
    from searchengine.library import Library
    from searchengine.store.records import ModelInfo
    from searchengine.store.writes import Store
    from searchengine.store.connection import sqlite_url

    data = folder / f"library-{n}"
    data.mkdir(exist_ok=True)
    gen = synthetic.Library.make(seed=1)
    # Filled through the store alone: a Library would build (and save) a vector index on open.
    settings = Settings(data_dir=data)
    store = Store.open(sqlite_url(settings.store_path), location=str(settings.store_path))
    store.bind_model(ModelInfo("synthetic", "fp", Q, D, (1, 1)))
    have = len(store.image_ids())
    t = time.perf_counter()
    for s0 in range(have, n, CHUNK):
        v = gen.images(s0, min(CHUNK, n - s0))
        store.write_batch(new_images=[NewImage(f"h{s0 + i}", ImageMeta(1, 1), v[i], None, b"", (f"/p/{s0 + i}.jpg", 1, 1)) for i in range(len(v))])
    if have < n:
        print(f"  filled a {n:,}-image store in {time.perf_counter() - t:.0f} s")
    store.close()
    queries = gen.queries(n_queries)
    truth = ann.TopK(n_queries, 100)
    with_store = Library.open(Settings(data_dir=data, vector_tier="exact"), writable=False, vectors=False)
    for got, v in with_store.store.iter_vectors():
        truth.push(got, ann.max_sim(v, queries))
    with_store.close()
    rows = []
    fits = n * Q * (D * 4 + 8) < 0.6 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if not fits:
        print(f"  the exact tier would hold {n * Q * (D * 4 + 8) / 2**30:.0f} GiB in RAM: not opened")
        settings.vectors_path.unlink(missing_ok=True)
    for tier in ("exact", "ann") if fits else ("ann",):
        t = time.perf_counter()
        lib = Library.open(Settings(data_dir=data, vector_tier=tier))
        lib.maybe_retier(wait=True)
        opened = time.perf_counter() - t
        found = [lib.search_vectors(q[None], depth)[0].ids for q in queries]
        search = lambda q: lib.search_vectors(q[None], depth)  # noqa: E731
        p50, p99 = latencies(search, queries, 1)
        c50, c99 = latencies(search, queries, 16)
        name = tier if not isinstance(lib.index, ann.AnnIndex) else f"ann np{lib.index.params.nprobe} x{lib.index.params.overfetch}"
        rows.append((name, recall(found, truth.ids(), 10), recall(found, truth.ids(), 100), p50, p99, c50, c99, opened))
        lib.close()
    print(f"  {'Library.search_vectors':24s} {'R@10':>6s} {'R@100':>6s} {'p50':>7s} {'p99':>7s} {'p50x16':>7s} {'p99x16':>7s} {'open+build':>10s}")
    for name, r10, r100, p50, p99, c50, c99, b in rows:
        print(f"  {name:24s} {r10:6.3f} {r100:6.3f} {p50:6.1f}ms {p99:6.1f}ms {c50:6.1f}ms {c99:6.1f}ms {b:9.0f}s")
    if len(rows) == 2:
        print(f"  approximate against exact, p50: {rows[0][3] / rows[1][3]:.1f}x faster")
    print(f"  peak RSS so far {peak_gib():.1f} GiB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--folder", type=Path, default=Path("/tmp/ann-bench"))
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--store", type=int, default=0, metavar="N", help="also time Library.search_vectors on an N-image store, both tiers")
    args = ap.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    depth = Settings().k_candidates
    print(f"depth {depth} (k_candidates), {args.queries} queries, {os.cpu_count()} cores")
    for n in args.sizes:
        run_size(n, args.folder, depth, args.queries)
    if args.store:
        print(f"\n== the product's own path: a {args.store:,}-image store ==")
        product_path(args.folder, args.store, depth, args.queries)


if __name__ == "__main__":
    main()
