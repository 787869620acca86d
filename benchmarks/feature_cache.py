"""The ViT feature cache in fp16 against int8 (`itm_features=cache-int8`) on the real-size
model (blip2-itm-vit-g architecture, random weights): bytes an image on disk, the time to
read 20 candidates' entries and re-rank them with ITM, and the ITM difference int8 makes
(|dp| against fp16, and against the ViT output itself) on real photos.

    python benchmarks/feature_cache.py --photos 20
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import median_ms, model_dir, photos  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=20)
    args = parser.parse_args()
    import torch
    from PIL import Image

    from searchengine.vectors.feature_cache import FeatureCache
    from searchengine.models.retrieval import RetrievalModel

    model = RetrievalModel.load(str(model_dir("real")), device="cpu", dtype="float32")
    images = [Image.open(p).convert("RGB") for p in photos(args.photos)]
    t = time.perf_counter()
    vit = torch.cat([model.vit(model.preprocess(images[i : i + 4])) for i in range(0, len(images), 4)]).numpy()
    print(f"ViT of {len(images)} photos: {time.perf_counter() - t:.0f} s; output {vit.shape[1:]} per image", flush=True)
    root = Path(tempfile.mkdtemp(prefix="featcache-"))
    caches = {"fp16": FeatureCache(root / "fp16", vit.shape[1:]), "int8": FeatureCache(root / "int8", vit.shape[1:], int8=True)}
    for cache in caches.values():
        for i, v in enumerate(vit):
            cache.put(i, v)
    text = "a photo of a flower in a garden"
    exact = model.itm(text, torch.from_numpy(vit))
    got = {}
    for name, cache in caches.items():
        size = cache.path(0).stat().st_size

        def rerank():
            feats = torch.stack([torch.from_numpy(np.array(cache.get(i))).float() for i in range(len(vit))])
            return model.itm(text, feats)

        ms = median_ms(rerank, 3)
        got[name] = rerank()
        print(f"  {name}: {size / 1024:6.0f} KiB an image; read + ITM of {len(vit)}: {ms:6.0f} ms; "
              f"max |dp| against the ViT output itself {np.abs(got[name] - exact).max():.2e}", flush=True)
    print(f"int8 against fp16: {caches['int8'].path(0).stat().st_size / caches['fp16'].path(0).stat().st_size:.3f}x the disk, "
          f"max ITM |dp| {np.abs(got['int8'] - got['fp16']).max():.2e}")


if __name__ == "__main__":
    main()
