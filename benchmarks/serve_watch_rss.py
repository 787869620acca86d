"""Memory of `serve --watch` against `serve` on the same library (one FAISS copy or two?).

    python benchmarks/serve_watch_rss.py [--images 100000]

Builds a library of `--images` synthetic images for a tiny model (8 vectors of 16 floats per
image: 512 bytes of FAISS per image; the real model's 32 x 256 make it 32 KiB), then starts
`serve` and `serve --watch EMPTY_FOLDER` on it in turn, waits until /healthz is ok and the
watcher has caught up, and prints each one's resident memory (VmRSS, and VmHWM, the peak) and
the difference, next to the size of one in-memory copy of the vector index. Before the
watcher shared the server's Library, the difference was a second copy of the vector index.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_library(data_dir: Path, model_dir: Path, images: int) -> int:
    """Write `images` synthetic images for the model in `model_dir`; return bytes per FAISS copy."""
    from searchengine.media.imageio import ImageMeta
    from searchengine.store.records import NewImage
    from searchengine.library import Library, model_info
    from searchengine.models.retrieval import RetrievalModel
    from searchengine.config.settings import Settings

    model = RetrievalModel.load(str(model_dir), device="cpu")
    settings = Settings(data_dir=data_dir, model=str(model_dir))
    library = Library.open(settings, create=True)
    library.bind(model_info(model))
    q, d = model.num_query_tokens, model.embed_dim
    rng = np.random.default_rng(0)
    for start in range(0, images, 2000):
        n = min(2000, images - start)
        vecs = rng.normal(size=(n, q, d)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=2, keepdims=True)
        batch = [
            NewImage(f"{start + i:064x}", ImageMeta(width=64, height=48), vecs[i], None, b"", (f"/photos/img_{start + i:07d}.jpg", 1000, 1))
            for i in range(n)
        ]
        ids, _ = library.store.write_batch(new_images=batch)
        library.add_vectors(ids, vecs)
    library.save()
    library.close()
    return images * q * d * 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(args: list[str], env: dict) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB of a server started with `args`, once it is ready and settled."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from searchengine.app.cli import main; sys.exit(main(sys.argv[1:]))",
         "serve", "--port", str(port), *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server stopped: {proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    if json.load(r)["status"] == "ok":
                        break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError("the server did not get ready")
        # A search, so that both have touched the vector index the same way; then settle.
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/search?q=dog&rerank=false&mode=semantic", timeout=120).read()
        time.sleep(3)
        return status_kib(proc.pid, "VmRSS"), status_kib(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100_000)
    args = ap.parse_args()
    from searchengine.models.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model_dir = build_tiny_model(tmp_path / "model")
        t = time.perf_counter()
        copy = build_library(tmp_path / "data", model_dir, args.images)
        print(f"{args.images:,} images written in {time.perf_counter() - t:.0f} s; one FAISS copy: {copy / 2**20:.1f} MiB")
        (tmp_path / "empty").mkdir()
        env = {**os.environ, "SEARCHENGINE_DATA_DIR": str(tmp_path / "data"), "SEARCHENGINE_CAPTIONS": "false",
               "OMP_WAIT_POLICY": "PASSIVE", "SEARCHENGINE_BACKUPS": "0"}
        serve = measure([], env)
        watch = measure(["--watch", str(tmp_path / "empty")], env)
        for name, (rss, hwm) in (("serve", serve), ("serve --watch", watch)):
            print(f"{name:14s} RSS {rss / 1024:8.1f} MiB   peak {hwm / 1024:8.1f} MiB")
        extra = (watch[0] - serve[0]) * 1024
        print(f"serve --watch holds {extra / 2**20:+.1f} MiB more than serve: {extra / copy:.2f} FAISS copies")


if __name__ == "__main__":
    main()
