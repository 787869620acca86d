"""bfloat16 against float32 on this CPU, in one run, on the real-size blip2-itm-vit-g
architecture (random weights): what `dtype auto` picks on a CPU with avx512_bf16 (as on a GPU)
against what it picks on an AVX2-only one.

- images: ViT + Q-Former + ITC projection of one indexing batch (what indexing spends its
  time on), s a image, and the smallest ITC cosine against float32;
- ITM: re-ranking `--candidates` from cached ViT outputs (read as float16, as the feature cache
  keeps them), and the largest |delta P(match)|;
- text: one query (10 tokens, as bert-base-uncased splits "a dog running on a beach at
  sunset") on torch float32, torch bf16 and ONNX Runtime (the float32 export that
  text_backend onnx uses whatever the dtype), ms, and the ITC cosine against float32.

Each line gives the ratio against float32 measured in the same run (this machine is shared):

    python benchmarks/bf16_speed.py --images 4 --repeat 5
    python benchmarks/bf16_speed.py --size tiny      # the tests' model: seconds, for a smoke run
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

QUERY_TOKENS = 10


def cpu_flags() -> str:
    from searchengine.models.loading import cpu_supports_bf16

    return "avx512_bf16 (dtype auto: bfloat16)" if cpu_supports_bf16() else "no bf16 instructions (dtype auto: float32)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="real", choices=["real", "tiny"])
    parser.add_argument("--images", type=int, default=2, help="images in the timed batch")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    quiet()
    import torch

    from searchengine.models.retrieval import RetrievalModel
    from searchengine.models.onnx_text import OnnxTextEncoder

    if args.size == "tiny":
        from searchengine.models.tiny import build_tiny_model

        path = build_tiny_model(Path(tempfile.mkdtemp(prefix="bf16-speed-")), seed=0)
    else:
        path = model_dir("real")
    models = {dt: RetrievalModel.load(str(path), device="cpu", dtype=dt) for dt in ("float32", "bfloat16")}
    assert models["float32"].fingerprint == models["bfloat16"].fingerprint
    rng = np.random.default_rng(0)
    ref = models["float32"]
    pixels = torch.from_numpy(rng.standard_normal((args.images, 3, ref.image_size, ref.image_size)).astype(np.float32))
    vit = torch.from_numpy(rng.standard_normal((args.candidates, *ref.vit_shape)).astype(np.float16))
    tok = ref.tokenize(["a dog running on a beach at sunset"])
    ids, mask = tok["input_ids"], tok["attention_mask"]
    if args.size == "real":  # the toy tokenizer's ids, cut to the real tokenizer's length
        ids = torch.cat([ids[:, : QUERY_TOKENS - 1], ids[:, -1:]], dim=1)
        mask = torch.ones_like(ids)

    def text_of(model):
        with torch.inference_mode():
            return model.text_features(ids, mask).float().numpy()

    def itm_of(model):
        return model._itm({"input_ids": ids, "attention_mask": mask}, vit, 32)

    rows = []
    out = {}
    for dt, model in models.items():
        t = time.perf_counter()
        itc = model.embed_pixels(pixels).itc  # warm-up and the output
        image_s = time.perf_counter() - t
        for _ in range(args.repeat - 1):
            t = time.perf_counter()
            model.embed_pixels(pixels)
            image_s = min(image_s, time.perf_counter() - t)
        out[dt] = itc, itm_of(model), text_of(model)
        rows.append((dt, image_s / args.images, median_ms(lambda: itm_of(model), args.repeat) / 1000,
                     median_ms(lambda: text_of(model), max(5, args.repeat * 3))))
        print(f"  measured torch {dt}", flush=True)
    encoder = OnnxTextEncoder(models["bfloat16"], Path(tempfile.mkdtemp(prefix="bf16-onnx-")))
    onnx_ms = median_ms(lambda: encoder(ids.numpy(), mask.numpy()), max(5, args.repeat * 3))
    onnx_cos = float((encoder(ids.numpy(), mask.numpy()) * out["float32"][2]).sum())

    itc32, itm32, text32 = out["float32"]
    itc16, itm16, text16 = out["bfloat16"]
    base = rows[0]
    print(f"\n{torch.get_num_threads()} threads; this CPU: {cpu_flags()}; {args.size}-size model")
    print(f"{'':18s} {'img s':>8s} {'x fp32':>7s} {'ITM s':>7s} {'x fp32':>7s} {'text ms':>8s} {'x fp32':>7s}")
    for dt, img, itm, txt in rows:
        print(f"torch {dt:12s} {img:8.2f} {base[1] / img:7.2f} {itm:7.2f} {base[2] / itm:7.2f} {txt:8.1f} {base[3] / txt:7.2f}")
    print(f"{'onnx float32':18s} {'':8s} {'':7s} {'':7s} {'':7s} {onnx_ms:8.1f} {base[3] / onnx_ms:7.2f}")
    print(f"bf16 against fp32: min ITC cosine (images) {float((itc32 * itc16).sum(-1).min()):.6f}, "
          f"max ITM |dp| {float(np.abs(itm32 - itm16).max()):.1e}, text ITC cosine {float((text32 * text16).sum()):.6f}; "
          f"ONNX float32 text ITC cosine {onnx_cos:.7f}")


if __name__ == "__main__":
    main()
