"""Query latency by stage: text encode, ANN over a large index, ITM re-rank of 20, in one run.

    python benchmarks/query_latency.py [--size real|tiny] [--images 100000] [--rerank 20]

- encode: one text through the Q-Former text side (the real architecture, random weights).
- ann: exact max-sim over `--images` random images x Q vectors (FAISS flat inner product),
  top k_candidates=128, grouped by id.
- ITM re-rank of 20 candidates, from the fp16 ViT feature cache against re-running the ViT
  on the image files (decode included): the measurement behind `itm_features=auto`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import median_ms, model_dir, photos, quiet  # noqa: E402


def main() -> None:
    import torch

    from searchengine.vectors.feature_cache import FeatureCache
    from searchengine.media.imageio import decode_image, read_file
    from searchengine.models.retrieval import RetrievalModel
    from searchengine.vectors.exact import VectorIndex

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=["real", "tiny"], default="real")
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--rerank", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    quiet()
    model = RetrievalModel.load(str(model_dir(args.size)), device="cpu", dtype="auto")
    q, d = model.num_query_tokens, model.embed_dim
    print(f"{args.size} model on cpu ({model.vision_dtype}); index of {args.images:,} images x {q} vectors")

    encode = median_ms(lambda: model.embed_texts(["a dog running on a beach at sunset"]), args.repeat * 4)

    rng = np.random.default_rng(0)
    index = VectorIndex(d, q)
    for start in range(0, args.images, 10_000):
        n = min(10_000, args.images - start)
        v = rng.standard_normal((n, q, d)).astype(np.float32)
        index.add(np.arange(start, start + n), v / np.linalg.norm(v, axis=-1, keepdims=True))
    text = model.embed_texts(["a dog running on a beach at sunset"])
    ann = median_ms(lambda: index.search(text, 128), args.repeat * 2)

    files = [str(p) for p in photos(args.rerank)]
    query = "a dog running on a beach"
    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(Path(tmp), model.vit_shape)
        # The re-run arm is timed once (the real ViT takes seconds per image on a CPU); its
        # output fills the cache that the other arm then reads.
        t = time.perf_counter()
        images = [decode_image(read_file(f), max_pixels=10**9).image for f in files]
        vit = model.vit(model.preprocess(images))
        model.itm(query, vit)
        recomputed = (time.perf_counter() - t) * 1000
        for i, arr in enumerate(vit.float().numpy()):
            cache.put(i, arr)

        def from_cache():
            feats = torch.from_numpy(np.stack([np.asarray(cache.get(i)) for i in range(len(files))]))
            model.itm(query, feats)

        cached = median_ms(from_cache, args.repeat)

    print(f"text encode             : {encode:9.1f} ms")
    print(f"ANN top-128 (exact)     : {ann:9.1f} ms")
    print(f"ITM re-rank of {args.rerank}, cache : {cached:9.1f} ms")
    print(f"ITM re-rank of {args.rerank}, ViT re-run from files: {recomputed:9.1f} ms")
    print(f"ratio re-run / cache    : {recomputed / cached:.1f}x")
    print(f"cache size per image    : {np.prod(model.vit_shape) * 2 / 1024:.0f} KiB (fp16)")
    print(f"query total with cache  : {encode + ann + cached:9.1f} ms")


if __name__ == "__main__":
    main()
