"""Files keyed by image id, in 256 sub-folders, written whole by rename (a reader sees all of
a file or none). The base of the ViT feature cache and the thumbnails.

`sealed`/`unsealed`: the checksum a cache entry carries after its data (a cache's own tag and
a BLAKE2b digest of the data), so a damaged entry is recomputed, never used."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

from searchengine.util.durable import write_atomic


DIGEST_BYTES = 16


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def sealed(data: bytes, tag: bytes) -> bytes:
    """`data`, then `tag` and its digest."""
    return data + tag + _digest(data)


def unsealed(raw: bytes, tag: bytes) -> tuple[bytes, bool] | None:
    """(the data, whether it carried the checksum) of an entry `sealed` with `tag`, or of one
    written before checksums (returned whole, unchecked: its cache judges it); None when the
    checksum fails."""
    trailer = len(tag) + DIGEST_BYTES
    if raw[-trailer:-DIGEST_BYTES] != tag:
        return raw, False
    data = raw[:-trailer]
    return (data, True) if _digest(data) == raw[-DIGEST_BYTES:] else None


class IdFileCache:
    suffix = ""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, image_id: int) -> Path:
        return self.root / f"{image_id % 256:02x}" / f"{image_id}{self.suffix}"

    def put_bytes(self, image_id: int, data: bytes) -> None:
        path = self.path(image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: tmp.write_bytes(data), fsync=False)  # a cache: remade when missing

    def sweep(self) -> int:
        """Remove temporary files that a process which is gone left behind (a crash or a kill
        between write and rename); those of a live process are its writes in flight."""
        return sweep_temporary(self.root.glob("*/.*.tmp"))

    def delete(self, ids: Iterable[int]) -> None:
        for image_id in ids:
            self.path(int(image_id)).unlink(missing_ok=True)

    def ids(self) -> set[int]:
        if not self.root.is_dir():
            return set()
        return {int(p.name[: -len(self.suffix)]) for p in self.root.glob(f"*/*{self.suffix}") if p.name[: -len(self.suffix)].isdigit()}

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob(f"*/*{self.suffix}")) if self.root.is_dir() else 0


def sweep_temporary(paths: Iterable[Path]) -> int:
    """Delete `.NAME.PID[.THREAD].tmp` files whose process is no longer running."""
    swept = 0
    for p in paths:
        parts = p.name.split(".")
        pid = next((int(x) for x in parts[2:] if x.isdigit()), None)
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue
        if pid == os.getpid():
            continue
        p.unlink(missing_ok=True)
        swept += 1
    return swept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
