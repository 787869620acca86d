"""Fine-tuning throughput (issue 15): image-caption pairs trained per second at the real
BLIP-2 size (Q-Former 12 layers x 768, 32 queries, ViT-g outputs 257 x 1408), on cached ViT
outputs as `searchengine finetune` trains; against the baseline of the same steps with the
frozen ViT-g re-run for every image (what caching saves), measured in the same run.

Random weights and random ViT outputs: the cost of a step does not depend on their values.

    python benchmarks/finetune.py [--batch-sizes 8 16] [--steps 4] [--device cpu]
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vit-images", type=int, default=2, help="images to time the full ViT-g on (the baseline)")
    args = ap.parse_args()

    from transformers import Blip2VisionConfig, Blip2VisionModel

    from searchengine.tuning.finetune import Config
    from searchengine.tuning.training import batch_losses
    from searchengine.models.retrieval import RetrievalModel
    from searchengine.models.tiny import _WORDS, build_tiny_model

    transformers.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = build_tiny_model(Path(tmp) / "m", size="real", vision_layers=1)  # the ViT is not run: cached
        model = RetrievalModel.load(str(path), device=args.device, dtype="float32")
        print(f"real-size Q-Former built and loaded in {time.perf_counter() - t:.0f} s; torch threads {torch.get_num_threads()}")
    m = model.model
    trainable = [p for n, p in m.named_parameters() if not n.startswith("vision_model.")]
    print(f"trainable parameters: {sum(p.numel() for p in trainable) / 1e6:.0f}M")
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    temp = torch.nn.Parameter(torch.tensor(0.07))
    rng = np.random.default_rng(0)
    c = Config()
    rates = {}
    for b in args.batch_sizes:
        vit = torch.randn(b, *model.vit_shape).to(torch.float16).float().to(model.device)
        times = []
        for step in range(args.steps + 1):
            texts = [" ".join(rng.choice(_WORDS, 12)) for _ in range(b)]
            t = time.perf_counter()
            m.train()
            loss_itc, loss_itm = batch_losses(model, vit, texts, temp, rng, 0.5, c.label_smoothing)
            opt.zero_grad()
            (loss_itc + loss_itm).backward()
            opt.step()
            if model.device.startswith("cuda"):
                torch.cuda.synchronize()
            if step:  # the first step warms up
                times.append(time.perf_counter() - t)
        rates[b] = b / np.median(times)
        print(f"batch {b:3d}: {np.median(times):6.2f} s a step, {rates[b]:6.2f} pairs/s (cached ViT outputs)")

    # The baseline: the frozen ViT-g forward each image would cost if its outputs were not cached.
    t = time.perf_counter()
    v = Blip2VisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                          image_size=224, patch_size=14, qkv_bias=True)
    vision = Blip2VisionModel(v).eval().to(args.device)
    print(f"ViT-g built in {time.perf_counter() - t:.0f} s")
    pixels = torch.randn(args.vit_images, 3, 224, 224, device=args.device)
    with torch.inference_mode():
        vision(pixel_values=pixels[:1])
        t = time.perf_counter()
        vision(pixel_values=pixels)
        per_image = (time.perf_counter() - t) / args.vit_images
    print(f"ViT-g forward: {per_image:.2f} s an image")
    for b, rate in rates.items():
        uncached = 1 / (1 / rate + per_image)
        print(f"batch {b:3d}: cached {rate:.2f} pairs/s against {uncached:.2f} re-running the ViT: {rate / uncached:.1f}x")


if __name__ == "__main__":
    main()
