"""Small things several tests do: the photos and the settings most tests use, wait for a server to
be ready, fill a disk, an offline hub."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path


def photos_in(photos_dir: Path) -> list[Path]:
    """The test photos (the `photo_files` fixture), for fixtures of a wider scope."""
    return sorted(p for p in photos_dir.rglob("*") if p.suffix.lower() in {".jpg", ".png"})


def settings_for(data_dir: Path, model_dir: Path, **more):
    """The settings most tests run with (the `settings` fixture): the tiny model, on the CPU,
    in float32, in small batches."""
    from searchengine.config.settings import Settings

    return Settings(data_dir=data_dir, model=str(model_dir), device="cpu", dtype="float32", batch_size=4, **more)


def wait_healthy(client, tries: int = 300) -> None:
    """Until /healthz says the service is up (the model loads in the background)."""
    for _ in range(tries):
        if client.get("/healthz").status_code == 200:
            return
        time.sleep(0.05)


def fill_disk(path: Path) -> None:
    """Write `path` until its file system has not a byte left (unbuffered: a buffered file
    would fail again on close)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 16, 512, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)


# Not settings but facts of the machine and the run, kept where a test clears SEARCHENGINE_*:
# whether the CPU counts as having bf16 (`.ci/run` forces it, so `dtype auto` picks bfloat16 in
# every process the tests start) and the run's own cache folder.
MACHINE_VARIABLES = ("SEARCHENGINE_CPU_BF16", "SEARCHENGINE_CACHE_DIR")


def is_setting(name: str) -> bool:
    """A SEARCHENGINE_* setting that a test must not inherit from whoever runs it."""
    return name.startswith("SEARCHENGINE_") and name not in MACHINE_VARIABLES


def offline_hub_env(tmp_path: Path) -> dict[str, str]:
    """This environment with the hub at a closed local port (connections refused at once) and
    an empty or test-made hub cache in `tmp_path / "cache"`; no SEARCHENGINE_* settings."""
    env = {k: v for k, v in os.environ.items() if not (is_setting(k) or k.startswith("HF_"))}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_CACHE=str(tmp_path / "cache"),
               SEARCHENGINE_DATA_DIR=str(tmp_path / "data"))
    return env
