"""Threads that cooperate: `searchengine index` as shipped now (waiting OpenMP threads sleep)
against torch's default (they spin), idle and next to another busy process, in one run.

    python benchmarks/threads.py [-n 1000] [--repeat 2]

Indexes `-n` small generated JPEGs with the tiny model (so the model costs little and the
threads' contention shows) in a fresh process each time, alternating the two arms:
- before: torch imported ahead of the CLI, so libgomp starts with its default wait policy;
- now: the CLI as it runs (it sets OMP_WAIT_POLICY=PASSIVE unless the user set one).
"Under load" runs a pure-Python busy loop on one core throughout. Prints median seconds of
each arm's indexing time (as the command reports it: no start-up or model load) and the
ratio.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import model_dir  # noqa: E402

RUN = "import sys; from searchengine.app.cli import main; sys.exit(main(sys.argv[1:]))"


def images(folder: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((256, 256), Image.Resampling.BICUBIC).save(folder / f"{i:04d}.jpg", quality=85)


def index(folder: Path, data: Path, before: bool) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(SEARCHENGINE_DATA_DIR=str(data), SEARCHENGINE_CAPTIONS="false", SEARCHENGINE_BACKUPS="0")
    code = ("import torch; " if before else "") + RUN
    out = subprocess.run([sys.executable, "-c", code, "index", str(folder), "--model", str(model_dir("tiny"))],
                         env=env, check=True, capture_output=True, text=True).stdout
    return float(re.search(r"indexing ([\d.]+) s", out).group(1))  # the run, without start-up and model load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        images(folder, args.n)
        print(f"{args.n} JPEGs of 256x256, tiny model, {os.cpu_count()} cores; median seconds per index run")
        for load in (False, True):
            burner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load else None
            try:
                times: dict[str, list[float]] = {"before": [], "now": []}
                for r in range(args.repeat):
                    for arm in ("before", "now"):
                        times[arm].append(index(folder, Path(tmp) / f"data-{load}-{arm}-{r}", arm == "before"))
            finally:
                if burner is not None:
                    burner.kill()
            b, a = statistics.median(times["before"]), statistics.median(times["now"])
            print(f"{'under load' if load else 'idle':10s}  before (spinning) {b:6.1f} s   now (sleeping) {a:6.1f} s   ratio {b / a:5.2f}x")


if __name__ == "__main__":
    main()
