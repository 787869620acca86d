"""Captioning: throughput batched vs one image at a time, and what captions add to indexing.

    python benchmarks/captioning.py [--size real|tiny] [-n 16] [--index-n 8]

Captioner: a random-weight `BlipForConditionalGeneration` of blip-image-captioning-base's
architecture (ViT-B/16 at 384, BERT-base decoder; the CPU default), greedy, `--tokens` new
tokens. Random weights never emit the end token, so every caption runs the full length; the
real model stops earlier (about 10 to 15 tokens for a COCO-style caption), so real captions are
faster than measured here, batched a little less so (a batch runs until its longest caption).

Arms, in one run on the same decoded photos:
1. one at a time: `Captioner.caption_pixels` on each photo alone (what a first script would do);
2. batched: `Captioner.caption_pixels` on batches of `--batch-size` (what the indexer does);
3. and 4. `Indexer.run` over `--index-n` photos with the real-size retrieval model, without
   and with the captioner: the extra indexing cost of captions, per image and in percent.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import CACHE, model_dir, photos, quiet  # noqa: E402


def captioner_dir(size: str) -> Path:
    from searchengine.models.tiny import build_tiny_captioner

    path = CACHE / f"blip-{size}-random"
    if not (path / "config.json").exists():
        t = time.perf_counter()
        build_tiny_captioner(path, kind="blip", size=size)
        print(f"built a {size} random BLIP captioner in {path} ({time.perf_counter() - t:.0f} s)")
    return path


def index(model_path: Path, files: list[Path], captioner, batch_size: int) -> float:
    from PIL import Image

    from searchengine.indexing.pipeline import Indexer
    from searchengine.library import Library
    from searchengine.models.retrieval import RetrievalModel
    from searchengine.config.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for i, f in enumerate(files):
            (folder / f"{i:04d}{f.suffix}").write_bytes(f.read_bytes() + b"\0" * i)  # distinct content
        settings = Settings(data_dir=Path(tmp) / "data", model=str(model_path), batch_size=batch_size)
        model = RetrievalModel.load(str(model_path), device="cpu")
        model.embed_images([Image.new("RGB", (64, 64))])  # warm-up
        library = Library.open(settings, create=True)
        t = time.perf_counter()
        summary = Indexer(model, library, settings, captioner=captioner).run([folder])
        elapsed = time.perf_counter() - t
        library.close()
        assert summary.indexed == len(files) and summary.caption_failed == 0, summary
        if captioner is not None:
            assert summary.captioned == len(files)
        return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=["real", "tiny"], default="real")
    ap.add_argument("-n", type=int, default=16, help="photos captioned in arms 1 and 2")
    ap.add_argument("--index-n", type=int, default=8, help="photos indexed in arms 3 and 4 (0: skip them)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=20, help="new tokens per caption")
    args = ap.parse_args()
    quiet()
    import torch
    from PIL import Image

    from searchengine.models.captioner import Captioner
    from searchengine.media.imageio import decode_image, read_file

    cap = Captioner.load(str(captioner_dir(args.size)), device="cpu", max_new_tokens=args.tokens)
    files = photos(args.n)
    images = [decode_image(read_file(str(f)), max_pixels=10**9).image for f in files]
    print(f"{args.n} real photos, {args.size} BLIP captioner in {str(cap.dtype).replace('torch.', '')}, "
          f"{args.tokens} tokens greedy, {torch.get_num_threads()} threads")
    cap.caption([Image.new("RGB", (64, 64))])  # warm-up

    pixels = cap.preprocess(images)  # once for both arms: what differs is generation alone
    t = time.perf_counter()
    single = [cap.caption_pixels(pixels[i : i + 1])[0].text for i in range(len(images))]
    one = time.perf_counter() - t
    t = time.perf_counter()
    batched = []
    for i in range(0, len(images), args.batch_size):
        batched += [c.text for c in cap.caption_pixels(pixels[i : i + args.batch_size])]
    many = time.perf_counter() - t
    same = sum(a == b for a, b in zip(single, batched))
    print(f"one at a time        : {args.n / one:7.3f} images/s ({one:.1f} s)")
    print(f"batched ({args.batch_size:2d})         : {args.n / many:7.3f} images/s ({many:.1f} s)")
    print(f"ratio batched / one  : {one / many:.2f}x  ({same}/{args.n} captions identical to one-at-a-time)")

    if args.index_n:
        retrieval = model_dir(args.size)
        subset = photos(args.index_n)
        plain = index(retrieval, subset, None, args.batch_size)
        captioned = index(retrieval, subset, cap, args.batch_size)
        extra = (captioned - plain) / args.index_n
        print(f"index without captions: {args.index_n / plain:7.3f} images/s ({plain:.1f} s)")
        print(f"index with captions   : {args.index_n / captioned:7.3f} images/s ({captioned:.1f} s)")
        print(f"captions add          : {extra:.2f} s per image, {100 * (captioned - plain) / plain:.0f}% to indexing time")


if __name__ == "__main__":
    main()
