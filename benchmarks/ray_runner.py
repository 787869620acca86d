"""The Ray runner against the local runner, on this machine, in one run: the `index` command
(a fresh process and data directory each time, tiny models, so that the runner's own costs
show) on a folder of N distinct photos and on a folder of one, with and without captions.

    pip install 'ray[data]'
    python benchmarks/ray_runner.py [-n 240]

Reported per runner: the indexing seconds and images/s as the command prints them, and the
whole command's wall time (model loading, and for Ray its start-up, included). The Ray run
starts a local instance (no --ray-address), as a user without a cluster would.
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

from benchmarks.common import EXE, model_dir, photos  # noqa: E402


def distinct_jpegs(folder: Path, n: int) -> Path:
    """n files of distinct content: the photos' JPEGs with a different tail after the end
    marker (decoders ignore it; the content hash differs, so none is linked as a copy)."""
    folder.mkdir(parents=True, exist_ok=True)
    jpegs = [p for p in photos(60) if p.suffix.lower() == ".jpg"]
    for i in range(n):
        (folder / f"{i:05d}.jpg").write_bytes(jpegs[i % len(jpegs)].read_bytes() + i.to_bytes(4, "big"))
    return folder


def index(folder: Path, data: Path, extra: list[str]) -> tuple[float, float, float]:
    """(indexing seconds, images/s, wall seconds) of one `index` command."""
    env = {**os.environ, "SEARCHENGINE_DATA_DIR": str(data), "SEARCHENGINE_BACKUPS": "0", "OMP_WAIT_POLICY": "PASSIVE"}
    t = time.perf_counter()
    out = subprocess.run([EXE, "index", str(folder), "--model", str(model_dir("tiny")), *extra],
                         env=env, check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t
    found = re.search(r"indexing ([\d.]+) s(?: \(([\d.]+) images/s\))?", out)
    return float(found.group(1)), float(found.group(2) or 0), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=240)
    args = ap.parse_args()
    from searchengine.models.tiny import build_tiny_captioner

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        many, one = distinct_jpegs(tmp / "many", args.n), distinct_jpegs(tmp / "one", 1)
        captioner = build_tiny_captioner(tmp / "cap", kind="blip")
        print(f"{os.cpu_count()} cores; tiny models; {args.n} distinct JPEGs (mate-backgrounds)")
        print(f"{'run':34s} {'index s':>8s} {'img/s':>7s} {'wall s':>7s}")
        results = {}
        for captions in (["--no-captions"], ["--caption-model", str(captioner)]):
            label = "no captions" if captions == ["--no-captions"] else "captions"
            for runner in ("local", "ray"):
                for name, folder in (("1 photo", one), (f"{args.n} photos", many)):
                    key = (label, runner, name)
                    results[key] = index(folder, tmp / "-".join(key).replace(" ", "_"), [*captions, "--runner", runner])
                    s, rate, wall = results[key]
                    print(f"{label + ', ' + runner + ', ' + name:34s} {s:8.1f} {rate:7.2f} {wall:7.1f}", flush=True)
            local, ray = results[(label, "local", f"{args.n} photos")], results[(label, "ray", f"{args.n} photos")]
            fixed = results[(label, "ray", "1 photo")][0] - results[(label, "local", "1 photo")][0]
            steady = (args.n - 1) / max(1e-9, ray[0] - results[(label, "ray", "1 photo")][0])
            print(f"  {label}: Ray / local images/s {ray[1] / local[1]:.2f}x; Ray's fixed cost {fixed:.1f} s "
                  f"(start-up, actors loading the models); Ray's steady rate {steady:.2f} images/s")


if __name__ == "__main__":
    main()
