"""Walk photo folders and list the image files in them (no reading, just names and stats)."""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from searchengine.media.imageio import image_extensions
from searchengine.media.links import DEFAULT, LinkPolicy, folder_link_allowed, inside_library

log = logging.getLogger(__name__)

# Why a symlinked folder was not walked: it leads back to a folder that contains it, or to a
# folder already listed under another path; or why a link was not followed at all: it leads
# outside the library, which the link policy does not allow (see searchengine.media.links).
LINK_LOOP = "loop"
LINK_DUPLICATE = "duplicate"
LINK_OUTSIDE = "outside"


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    mtime_ns: int


def _folder_key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def scan_folder(
    root: Path,
    *,
    exclude: tuple[Path, ...] = (),
    on_error: Callable[[str, str], None] | None = None,
    on_skipped_link: Callable[[str, str], None] | None = None,
    links: LinkPolicy = DEFAULT,
    roots: tuple[Path, ...] = (),
) -> Iterator[FileEntry]:
    """Yield every image file below `root`, depth first, in a stable (sorted) order.

    Hidden files and folders are skipped, as are the folders in `exclude` (the data
    directory, if it lies inside a library). Symlinked folders are followed, each real folder
    once: folders are told apart by (st_dev, st_ino), so a link that leads to a folder already
    listed is skipped, as is one that leads to a folder containing the link (a loop), and both
    are reported to `on_skipped_link(path, reason)` with reason LINK_DUPLICATE or LINK_LOOP. Links are walked after every folder
    reachable without them, so a folder that is both in the tree and linked to is listed
    under its real path, whatever the names sort like.

    `links` says which links may lead outside the library (`roots`, the library's folders,
    default just `root`): a file link or a folder link it does not allow is reported as
    LINK_OUTSIDE and not listed or walked. File links it allows are listed as files.
    """
    library = [str(r) for r in (roots or (root,))]
    if str(root) not in library:
        library.append(str(root))
    extensions = image_extensions()
    excluded: set[tuple[int, int]] = set()
    for path in exclude:
        try:
            excluded.add(_folder_key(os.stat(path)))
        except OSError:
            pass  # not there: nothing to leave out
    try:
        visited = {_folder_key(os.stat(root))}
    except OSError as e:
        if on_error:
            on_error(str(root), f"cannot list folder: {e.strerror or e}")
        return
    folder_links: deque[str] = deque()  # symlinked folders, walked once the real tree is done

    def walk(start: str) -> Iterator[FileEntry]:
        stack = [start]
        while stack:
            folder = stack.pop()
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
                        key = _folder_key(entry.stat(follow_symlinks=False))
                        if key not in excluded and key not in visited:
                            visited.add(key)
                            subfolders.append(entry.path)
                    elif entry.is_symlink() and entry.is_dir():
                        folder_links.append(entry.path)
                    elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in extensions:
                        if entry.is_symlink() and not inside_library(entry.path, library, links):
                            log.info("not following %s: it leads outside the library", entry.path)
                            if on_skipped_link:
                                on_skipped_link(entry.path, LINK_OUTSIDE)
                            continue
                        st = entry.stat()
                        yield FileEntry(entry.path, st.st_size, st.st_mtime_ns)
                except OSError:
                    continue  # vanished between listing and stat: it is simply not there
            stack.extend(reversed(subfolders))

    yield from walk(str(root))
    while folder_links:
        link = folder_links.popleft()
        try:
            key = _folder_key(os.stat(link))
        except OSError:
            continue  # the link broke meanwhile
        if key in excluded:
            continue
        # A link to a folder that contains it is a loop even where that folder was not listed
        # (a link to `..` in the root): following it would walk everything around the library.
        reason = (
            LINK_LOOP if _leads_to_an_ancestor(link)
            else LINK_DUPLICATE if key in visited
            else LINK_OUTSIDE if not folder_link_allowed(link, library, links)
            else None
        )
        if reason is not None:
            log.info("not following %s: %s", link, WHY_NOT[reason])
            if on_skipped_link:
                on_skipped_link(link, reason)
            continue
        visited.add(key)
        yield from walk(link)


WHY_NOT = {LINK_LOOP: "it loops back", LINK_DUPLICATE: "already listed", LINK_OUTSIDE: "it leads outside the library"}


def _leads_to_an_ancestor(link: str) -> bool:
    """Whether the folder `link` points at contains the link itself."""
    target = os.path.realpath(link)
    here = os.path.realpath(os.path.dirname(link))
    return here == target or here.startswith(target.rstrip(os.sep) + os.sep)


BAD_NAME = (
    "the file name is not valid UTF-8, and the index stores names as text; rename the file "
    "(`convmv` converts names from another encoding)"
)


def storable(path: str) -> bool:
    """Whether a path can be stored and served as text: names in another encoding than UTF-8
    come from the OS with surrogate escapes, which no database text column takes."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(path: str) -> str:
    """The path as a user can read it in a message, bad bytes shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")
