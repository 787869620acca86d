"""What `finetune --train-vision N` costs a step (issue 33): seconds a step and peak memory at
the real BLIP-2 size (Q-Former 12 x 768, 32 queries, ViT-g blocks 1408 wide, 257 tokens),
frozen (N = 0, the baseline) against N trained ViT blocks, each setting in a process of its
own so that its peak memory is its own, measured in the same run.

Random weights and random cached outputs: a step's cost does not depend on their values. The
ViT is built with N + 1 blocks: the frozen blocks below are not run by a step (their outputs
are cached), so their count does not change its cost; the parameters of the full ViT-g
(1.0 B) are not held, so the memory reported is the step's own: the trained weights, their
gradients and AdamW's two moments, and the activations. On a real model add 4.0 GB (the frozen
ViT-g in float32) to each.

    python benchmarks/finetune_vision.py [--blocks 0 2] [--batch 8] [--steps 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def one(blocks: int, batch: int, steps: int, device: str) -> dict:
    """In this process: the steps of one setting; its seconds a step and memory."""
    import resource

    import numpy as np
    import torch
    import transformers

    from searchengine.models.retrieval import RetrievalModel
    from searchengine.models.tiny import _WORDS, build_tiny_model
    from searchengine.tuning.training import Schedule, Trainer
    from searchengine.tuning.vision import VisionSplit

    transformers.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(Path(tmp) / "m", size="real", vision_layers=blocks + 1)
        model = RetrievalModel.load(str(path), device=device, dtype="float32")
    split = VisionSplit(model, blocks)
    trainer = Trainer(model, split, Schedule(lr=1e-5, total=steps + 1), weight_decay=0.05, layer_decay=0.95,
                      temp_init=0.07, smoothing=0.1, seed=0)
    trained = sum(p.numel() for n, p in model.model.named_parameters() if split.is_trained(n))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rng = np.random.default_rng(0)
    times = []
    for step in range(steps + 1):
        vit = torch.randn(batch, *model.vit_shape).to(torch.float16).float().to(model.device)
        texts = [" ".join(rng.choice(_WORDS, 12)) for _ in range(batch)]
        t = time.perf_counter()
        trainer.step(step, vit, texts, np.random.default_rng(step))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step:  # the first step warms up
            times.append(time.perf_counter() - t)
    out = {"blocks": blocks, "trained_params_M": round(trained / 1e6, 1), "s_per_step": round(float(np.median(times)), 3),
           "peak_rss_growth_GB": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 2**20, 2)}
    if device.startswith("cuda"):
        out["peak_cuda_GB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.batch, args.steps, args.device)))
        return
    results = []
    for blocks in args.blocks:
        proc = subprocess.run([sys.executable, __file__, "--one", str(blocks), "--batch", str(args.batch),
                               "--steps", str(args.steps), "--device", args.device], capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"--train-vision {r['blocks']}: {r['trained_params_M']}M trained parameters, {r['s_per_step']:.2f} s a step "
              f"(batch {args.batch}), peak memory +{r['peak_rss_growth_GB']:.2f} GB" +
              (f", CUDA peak {r['peak_cuda_GB']:.2f} GB" if "peak_cuda_GB" in r else ""), flush=True)
    base = results[0]
    for r in results[1:]:
        print(f"--train-vision {r['blocks']} against {base['blocks']}: {r['s_per_step'] / base['s_per_step']:.2f}x the time a step, "
              f"+{r['peak_rss_growth_GB'] - base['peak_rss_growth_GB']:.2f} GB peak memory")


if __name__ == "__main__":
    main()
