"""Walk photo folders and list the image files in them (no reading, just names and stats)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from searchengine.imageio import image_extensions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    mtime_ns: int


def scan_folder(
    root: Path,
    *,
    exclude: tuple[Path, ...] = (),
    on_error: Callable[[str, str], None] | None = None,
) -> Iterator[FileEntry]:
    """Yield every image file below `root`, depth first, in a stable (sorted) order.

    Hidden files and folders are skipped, as are folder symlinks (they can loop) and the
    folders in `exclude` (the data directory, if it lies inside a library).
    """
    extensions = image_extensions()
    excluded = {str(p) for p in exclude}
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        if folder in excluded:
            continue
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            log.warning("cannot list %s: %s", folder, e.strerror or e)
            if on_error:
                on_error(folder, f"cannot list folder: {e.strerror or e}")
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    subfolders.append(entry.path)
                elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in extensions:
                    st = entry.stat()
                    yield FileEntry(entry.path, st.st_size, st.st_mtime_ns)
            except OSError:
                continue  # vanished between listing and stat: it is simply not there
        stack.extend(reversed(subfolders))
