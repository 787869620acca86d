"""Feed rate on the CPU: how fast photos become model input (what would feed a GPU), in one run.

    python benchmarks/feed_rate.py [-n 24] [--index]

Stand-ins for 12 MP phone photos: mate-backgrounds upscaled to 4000x3000 JPEGs (made once,
kept in the benchmark cache). Measured, one core each unless said:
- baseline: a plain single-thread `Image.open(f).convert("RGB")` loop (a full decode);
- the decode stage on the exact path (`decode = "exact"`: full decode, the reference
  processor resizes from full size) and on the fast path (`decode = "fast"`: JPEG DCT
  scaling to the smallest size the model, captioner and thumbnail still need, then the same
  processor), each producing retrieval pixels, caption pixels (BLIP base's 384 px) and the
  thumbnail, as indexing does; and on the device path (`decode = "device"`) run on the CPU:
  PIL's reduced decode standing in for nvJPEG, then the tensor resize a GPU would run;
- with --index, the whole `searchengine index` command with the tiny model on every core
  (a fresh process and data dir), as images/s and as a ratio to the baseline.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import CACHE, model_dir, photos, quiet  # noqa: E402


def stand_ins(n: int) -> list[Path]:
    """`n` 4000x3000 JPEGs (quality 90) made from the real photos, kept between runs. Past the
    first round of photos each is cropped a little more, so every file is new content (a
    copy would be linked by its hash, not decoded)."""
    from PIL import Image

    folder = CACHE / "12mp"
    folder.mkdir(parents=True, exist_ok=True)
    sources = photos(n)
    rounds = len(set(sources))
    out = []
    for i, src in enumerate(sources):
        dst = folder / f"{i:03d}.jpg"
        if not dst.exists():
            k = i // rounds
            with Image.open(src) as im:
                im = im.convert("RGB")
                im = im.crop((16 * k, 12 * k, im.width - 16 * k, im.height - 12 * k)) if k else im
                im.resize((4000, 3000), Image.Resampling.BICUBIC).save(dst, quality=90)
        out.append(dst)
    return out


def rate(fn, files: list[Path]) -> float:
    fn(files[0])  # warm-up
    t = time.perf_counter()
    for f in files:
        fn(f)
    return len(files) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=24)
    ap.add_argument("--index", action="store_true", help="also time the whole index command")
    ap.add_argument("--parity", action="store_true", help="ITC of the fast path against the exact one (real-size model)")
    args = ap.parse_args()
    quiet()
    import torch
    from PIL import Image

    from searchengine.indexing.scan import FileEntry
    from searchengine.indexing.stages import DecodeStage, ReadStage
    from searchengine.models.captioner import Captioner
    from searchengine.models.retrieval import RetrievalModel
    from searchengine.models.tiny import build_tiny_captioner

    torch.set_num_threads(1)
    files = stand_ins(args.n)
    model = RetrievalModel.load(str(model_dir("real")), device="cpu")  # the real processor's 224 px
    with tempfile.TemporaryDirectory() as tmp:
        captioner = Captioner.load(str(build_tiny_captioner(Path(tmp) / "cap", size="real")), device="cpu")
        read = ReadStage()

        def decoded_by(stage):
            def one(f: Path):
                st = f.stat()
                return stage(read(FileEntry(str(f), st.st_size, st.st_mtime_ns)))

            return one

        def stage(decode: str) -> DecodeStage:
            return DecodeStage(model.preprocessor, 150_000_000, 320, caption_preprocess=captioner.preprocessor, decode=decode, device="cpu")

        import searchengine.indexing.stages as stages

        base = rate(lambda f: Image.open(f).convert("RGB"), files)
        print(f"{args.n} JPEGs of 4000x3000; images/s on one core")
        print(f"full PIL decode (baseline)      {base:7.2f}")
        exact = rate(decoded_by(stage("exact")), files)
        print(f"decode stage, exact             {exact:7.2f}   ratio to baseline {exact / base:5.2f}x")
        for margin in (2, 1):
            stages.DRAFT_MARGIN = margin
            r = rate(decoded_by(stage("fast")), files)
            print(f"decode stage, fast, margin {margin}    {r:7.2f}   ratio to baseline {r / base:5.2f}x")
        # decode device on a CPU: PIL's reduced decode stands in for nvJPEG, then the tensor ops a GPU runs.
        r = rate(decoded_by(stage("device")), files)
        print(f"decode stage, device (on CPU)   {r:7.2f}   ratio to baseline {r / base:5.2f}x")
        if args.parity:
            parity(model, files, decoded_by, stage, stages)
        if args.index:
            data = Path(tmp) / "data"
            env = {**os.environ, "SEARCHENGINE_DATA_DIR": str(data), "SEARCHENGINE_CAPTIONS": "false",
                   "SEARCHENGINE_BACKUPS": "0"}
            folder = files[0].parent
            out = subprocess.run([sys.executable, "-c", "import sys; from searchengine.app.cli import main; sys.exit(main(sys.argv[1:]))",
                                  "index", str(folder), "--model", str(model_dir("tiny"))],
                                 env=env, check=True, capture_output=True, text=True).stdout
            whole = float(re.search(r"\(([\d.]+) images/s\)", out).group(1))  # the run, as the command reports it
            print(f"index command, tiny model, {os.cpu_count()} cores {whole:7.2f}   ratio to baseline {whole / base:5.2f}x")


def parity(model, files, decoded_by, stage, stages) -> None:
    """ITC cosine per vector between the fast and the exact pixels (the real architecture,
    random weights), and how often each image's nearest neighbour among the others agrees."""
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    exact = decoded_by(stage("exact"))
    ref = np.stack([model.embed_pixels(exact(f).pixels[None]).itc[0] for f in files])
    for margin, how in ((2, "fast"), (1, "fast"), (1, "device")):
        stages.DRAFT_MARGIN = margin
        fast = decoded_by(stage(how))
        got = np.stack([model.embed_pixels(fast(f).pixels[None]).itc[0] for f in files])
        cos = (ref * got).sum(-1)  # rows are unit vectors
        # Image-to-image neighbours (mean over vectors of the best match), exact vs fast.
        def neighbours(v):
            sims = np.einsum("aqd,bpd->abqp", v, v).max(-1).mean(-1)
            np.fill_diagonal(sims, -np.inf)
            return sims.argmax(1)
        agree = float((neighbours(ref) == neighbours(got)).mean())
        print(f"parity, {how}, margin {margin}: ITC cosine per vector mean {cos.mean():.6f} min {cos.min():.6f}; "
              f"nearest neighbour agreement {agree:.2f}")


if __name__ == "__main__":
    main()
