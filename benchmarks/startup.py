"""Start-up cost of the commands that need no model: `stats` and `search --mode keyword`,
and of two refusals: a second indexer, and `search --like` of an id not in the index.

    python benchmarks/startup.py [--images 2000] [--repeat 7]

Each command runs as a fresh process (what a user waits for), on an index of `--images`
synthetic images (tiny model, no files needed for keyword search). The baseline, measured in
the same run and alternated with it, is the same command in a process that first imports
torch and transformers, as every command did before (`_quiet_libraries` imported
transformers, and keyword search loaded the model and encoded the query). Prints medians
and the ratio baseline / now.

The refusals' baselines are the order they had before: the CLI's imports before the writer
lock (`searchengine.app.cli.main` called directly, not the entry point), and the retrieval model
(the tiny one here; a real one takes seconds more) loaded before the liked id is looked up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_index(data_dir: Path, images: int) -> None:
    from searchengine.library import Library
    from searchengine.config.settings import Settings
    from searchengine.media.imageio import ImageMeta
    from searchengine.store.records import NewImage
    from searchengine.store.records import ModelInfo

    settings = Settings(data_dir=data_dir)
    library = Library.open(settings, create=True)
    info = ModelInfo(name="bench/tiny", fingerprint="0" * 16, num_vectors=8, dim=16, vit_shape=(17, 32), dtype="float32")
    library.bind(info)
    rng = np.random.default_rng(0)
    words = ["beach", "dog", "snow", "mountain", "city", "flower", "car", "sunset", "forest", "lake"]
    for start in range(0, images, 500):
        batch = []
        for i in range(start, min(start + 500, images)):
            vec = rng.normal(size=(8, 16)).astype(np.float32)
            vec /= np.linalg.norm(vec, axis=1, keepdims=True)
            caption = " ".join(rng.choice(words, 4))
            path = f"/photos/{words[i % 10]}/img_{i:06d}.jpg"
            batch.append(NewImage(f"{i:064x}", ImageMeta(width=64, height=48, caption=caption), vec, None, b"", (path, 1000, 1)))
        ids, _ = library.store.write_batch(new_images=batch)
        library.add_vectors(ids, np.stack([b[2] for b in batch]))
    library.save()
    library.close()


def timed(code: str, env: dict) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        build_index(data, args.images)
        env = {**os.environ, "SEARCHENGINE_DATA_DIR": str(data), "OMP_WAIT_POLICY": "PASSIVE"}
        commands = {"stats": "['stats']", "keyword search": "['search', 'dog beach', '--mode', 'keyword']"}
        before = "import torch, transformers; "
        print(f"{args.images} images, {args.repeat} runs each, alternated; median seconds per fresh process")
        for name, argv in commands.items():
            now_code = f"from searchengine.app.cli import main; main({argv})"
            now, then = [], []
            for _ in range(args.repeat):
                now.append(timed(now_code, env))
                then.append(timed(before + now_code, env))
            a, b = statistics.median(now), statistics.median(then)
            print(f"{name:16s} now {a:6.2f} s   with torch+transformers imported (before) {b:6.2f} s   ratio {b / a:5.1f}x")
        refusals(Path(tmp), data, env, args.repeat)


def refusals(tmp: Path, data: Path, env: dict, repeat: int) -> None:
    import fcntl

    from searchengine.models.tiny import build_tiny_model

    model = build_tiny_model(tmp / "model", seed=0)
    load_first = (f"from searchengine import wiring; from searchengine.config.settings import Settings; "
                  f"wiring.load_model(Settings(device='cpu'), {str(model)!r}); ")
    cases = {
        "second indexer": ("from searchengine.app.entry import main; main(['index', '/nowhere'])",
                           "from searchengine.app.cli import main; main(['index', '/nowhere'])"),
        "search --like 9999": ("from searchengine.app.entry import main; main(['search', '--like', '9999'])",
                               load_first + "from searchengine.app.cli import main; main(['search', '--like', '9999'])"),
    }
    fd = os.open(data / "writer.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another indexer, as far as the commands can tell
    try:
        for name, (now_code, then_code) in cases.items():
            now, then = [], []
            for _ in range(repeat):
                now.append(timed_refusal(now_code, env))
                then.append(timed_refusal(then_code, env))
            a, b = statistics.median(now), statistics.median(then)
            print(f"{name:18s} refused in {a:6.2f} s   before {b:6.2f} s   ratio {b / a:5.1f}x")
    finally:
        os.close(fd)


def timed_refusal(code: str, env: dict) -> float:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    took = time.perf_counter() - t
    assert "another indexer is running" in r.stderr or "not in the index" in r.stderr, r.stderr
    return took


if __name__ == "__main__":
    main()
