"""Indexing throughput: the pipeline against a naive per-image fp32 loop, in one run.

    python benchmarks/index_throughput.py [--size real|tiny] [-n 16]

Baseline: for each file, open it with PIL, run the checkpoint's processor, embed it alone in
fp32 (what a first script would do). Pipeline: `Indexer` with automatic dtype, batches, and
decoding in threads overlapped with the model. Both embed the same real photos. Prints
images/s of each and the ratio; with --bf16 also the pipeline forced to bf16.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import model_dir, photos, quiet  # noqa: E402


def naive(model_path: Path, files: list[Path]) -> float:
    from PIL import Image

    from searchengine.models.retrieval import RetrievalModel

    model = RetrievalModel.load(str(model_path), device="cpu", dtype="float32")
    model.embed_images([Image.new("RGB", (64, 64))])  # warm-up
    t = time.perf_counter()
    for f in files:
        with Image.open(f) as im:
            model.embed_images([im.convert("RGB")])
    return time.perf_counter() - t


def pipeline(model_path: Path, files: list[Path], dtype: str, batch_size: int) -> tuple[float, str]:
    from PIL import Image

    from searchengine.indexing.pipeline import Indexer
    from searchengine.library import Library
    from searchengine.models.retrieval import RetrievalModel
    from searchengine.config.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for i, f in enumerate(files):  # distinct names; repeated photos get distinct bytes
            data = f.read_bytes() + b"\0" * i  # trailing bytes: decoders ignore them
            (folder / f"{i:04d}{f.suffix}").write_bytes(data)
        settings = Settings(data_dir=Path(tmp) / "data", model=str(model_path), dtype=dtype, batch_size=batch_size)
        model = RetrievalModel.load(str(model_path), device="cpu", dtype=dtype)
        model.embed_images([Image.new("RGB", (64, 64))])  # warm-up
        library = Library.open(settings, create=True)
        t = time.perf_counter()
        summary = Indexer(model, library, settings).run([folder])
        elapsed = time.perf_counter() - t
        library.close()
        assert summary.indexed == len(files), summary
        return elapsed, str(model.vision_dtype).replace("torch.", "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=["real", "tiny"], default="real")
    ap.add_argument("-n", type=int, default=16, help="photos to embed in each arm")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--bf16", action="store_true", help="also time the pipeline forced to bf16")
    args = ap.parse_args()
    quiet()
    path = model_dir(args.size)
    files = photos(args.n)
    mp = sum(_pixels(f) for f in files) / len(files) / 1e6
    print(f"{args.n} real photos (mean {mp:.1f} MP), {args.size} model, batch {args.batch_size}")

    base = naive(path, files)
    print(f"naive per-image fp32 loop : {args.n / base:7.3f} images/s ({base:.1f} s)")
    piped, dtype = pipeline(path, files, "auto", args.batch_size)
    print(f"pipeline (auto -> {dtype:8s}) : {args.n / piped:7.3f} images/s ({piped:.1f} s)")
    print(f"ratio pipeline / naive    : {base / piped:.2f}x")
    if args.bf16:
        bf, _ = pipeline(path, files, "bfloat16", args.batch_size)
        print(f"pipeline (bfloat16)       : {args.n / bf:7.3f} images/s ({bf:.1f} s); ratio to naive {base / bf:.2f}x")


def _pixels(f: Path) -> int:
    from PIL import Image

    with Image.open(f) as im:
        return im.width * im.height


if __name__ == "__main__":
    main()
