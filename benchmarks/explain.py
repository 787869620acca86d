"""What a "where it matches" map costs (issue 31): `RetrievalModel.explain` (one ITM forward
with the cross-attention written out, and one backward) for one image, at the real BLIP-2
size (Q-Former 12 x 768, 32 queries, ViT-g outputs 257 x 1408), against the baseline of one
plain ITM forward for the same image and words, measured in the same run, in float32 and in
bfloat16. The ViT is not run by either (re-ranking's ViT outputs are cached on a CPU); on a
miss add one ViT-g forward (benchmarks/finetune.py measures it).

Random weights and outputs: the cost does not depend on their values.

    python benchmarks/explain.py [--repeat 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args()

    import numpy as np
    import torch
    import transformers

    from searchengine.models.retrieval import RetrievalModel
    from searchengine.models.tiny import build_tiny_model

    transformers.logging.disable_progress_bar()
    text = "a red umbrella on the left of the picture"
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(Path(tmp) / "m", size="real", vision_layers=1)
        for dtype in args.dtypes:
            model = RetrievalModel.load(str(path), device=args.device, dtype=dtype)
            vit = torch.randn(1, *model.vit_shape).to(model.vision_dtype)
            model.itm(text, vit)
            model.explain(text, vit)  # warm-up
            plain, explained = [], []
            for _ in range(args.repeat):
                t = time.perf_counter()
                model.itm(text, vit)
                plain.append(time.perf_counter() - t)
                t = time.perf_counter()
                heat = model.explain(text, vit)
                explained.append(time.perf_counter() - t)
            p, e = float(np.median(plain)) * 1000, float(np.median(explained)) * 1000
            print(f"{dtype}: explain {e:.0f} ms an image ({heat.grid.shape[0]} x {heat.grid.shape[1]} map) against "
                  f"{p:.0f} ms for the ITM forward alone: {e / p:.1f}x; torch threads {torch.get_num_threads()}", flush=True)
            del model


if __name__ == "__main__":
    main()
