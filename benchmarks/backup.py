"""Store backups: time and size for a large store, against a plain file copy in the same run.

    python benchmarks/backup.py [--images 100000]

The store holds `--images` synthetic images with the real checkpoint's vectors (32 x 256
float32, 32 KiB each) plus their file rows and full-text rows, as `index` writes them. The
backup is SQLite's online backup (consistent while the store is in use) written whole; the
baseline is `shutil.copyfile` of the same store file, which is only safe when nothing writes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(settings, images: int) -> None:
    from searchengine.library import Library
    from searchengine.media.imageio import ImageMeta
    from searchengine.store.records import NewImage
    from searchengine.store.records import ModelInfo

    library = Library.open(settings, create=True, vectors=False)
    library.store.bind_model(ModelInfo("bench/real", "0" * 16, 32, 256, (257, 1408), "float32"))
    rng = np.random.default_rng(0)
    words = ["beach", "dog", "snow", "mountain", "city", "flower", "car", "sunset", "forest", "lake"]
    vec = rng.normal(size=(32, 256)).astype(np.float32)
    for start in range(0, images, 1000):
        batch = []
        for i in range(start, min(start + 1000, images)):
            caption = f"a {words[i % 10]} and a {words[(i // 10) % 10]} at {words[(i // 100) % 10]}"
            batch.append(NewImage(f"{i:064x}", ImageMeta(4000, 3000, caption=caption), vec, None, b"", (f"/photos/{i // 1000}/img_{i:07d}.jpg", 4_000_000, i)))
        library.store.write_batch(new_images=batch)
    library.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100_000)
    args = ap.parse_args()
    from searchengine.store import backup
    from searchengine.config.settings import Settings

    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        settings = Settings(data_dir=Path(tmp) / "data")
        t = time.perf_counter()
        build(settings, args.images)
        print(f"built a store of {args.images} images in {time.perf_counter() - t:.0f} s: "
              f"{settings.store_path.stat().st_size / 2**20:.0f} MiB")
        t = time.perf_counter()
        shutil.copyfile(settings.store_path, Path(tmp) / "plain-copy.db")
        copy_s = time.perf_counter() - t
        (Path(tmp) / "plain-copy.db").unlink()
        t = time.perf_counter()
        made = backup.make_backup(settings.store_path, 1, keep=1)
        backup_s = time.perf_counter() - t
        t = time.perf_counter()
        problem = backup.integrity_problem(made.path)
        check_s = time.perf_counter() - t
        print(f"backup: {backup_s:.1f} s, {made.size / 2**20:.0f} MiB ({made.size / args.images / 1024:.1f} KiB per image); "
              f"plain copy of the file: {copy_s:.1f} s; ratio backup/copy {backup_s / copy_s:.2f}x")
        print(f"integrity check of the backup (done before a restore): {check_s:.1f} s, {problem or 'ok'}")


if __name__ == "__main__":
    main()
