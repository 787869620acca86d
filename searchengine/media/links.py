"""Which symbolic links the library follows, and which paths count as inside it.

One rule, used by the scan (what gets indexed), the watcher (what gets marked) and the
service (what gets read and served):

- `folders` (the default): a symlinked folder inside a library folder is followed wherever it
  leads, and what it leads to becomes part of the library (linking an external disk's folder
  into ~/Pictures is how people add it). A symlinked *file* must lead into the library: into
  the real folder of one of its roots, or of one of the folder links on its own path. A link to
  a file anywhere else (`~/Pictures/x.jpg -> /home/other/secret.jpg`) is not indexed and never
  served.
- `none`: nothing outside the library's own folders: folder links that lead outside are not
  followed either.
- `all`: links are followed wherever they lead (the user allowed it).

Loops and folders listed twice are handled by the scan itself (see `searchengine.indexing.scan`).
"""

from __future__ import annotations

import os
from typing import Iterable, Literal

LinkPolicy = Literal["none", "folders", "all"]
POLICIES: tuple[LinkPolicy, ...] = ("none", "folders", "all")
DEFAULT: LinkPolicy = "folders"

OUTSIDE_MESSAGE = (
    "it is a link to a file outside the indexed folders, which is neither indexed nor served; "
    "index with --links all to allow links that lead anywhere"
)
OUTSIDE_FOLDER_MESSAGE = (
    "it is a link to a folder outside the indexed folders, not followed with --links none; "
    "index with --links folders (the default) to follow it"
)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _root_of(path: str, roots: Iterable[str]) -> str | None:
    """The longest root that `path` (as listed, not resolved) lies below."""
    below = [r for r in roots if _within(path, r) and path != r]
    return max(below, key=len) if below else None


def inside_library(path: str, roots: Iterable[str], policy: LinkPolicy, real: str | None = None) -> bool:
    """Whether `path`, a file as the scan lists it (below one of `roots`, maybe through
    folder links), resolves inside the library under `policy`.

    The library's real folders are the roots' real paths and, unless the policy is `none`, the
    real paths of the folder links between the root and the file. The file's real path (every
    link on the way resolved, its own included) must lie in one of them. `real`: that real
    path as already known (of a file opened through `path`: what was opened, which a link
    flipped after the open cannot change), else resolved from the name now.
    """
    if policy == "all":
        return True
    roots = list(roots)
    root = _root_of(path, roots)
    if root is None:
        return False
    real = os.path.realpath(path) if real is None else real
    allowed = [os.path.realpath(r) for r in roots]
    if policy == "folders":
        # Each folder on the way from the root to the file that is itself a link.
        parts = os.path.relpath(os.path.dirname(path), root).split(os.sep)
        step = root
        for part in parts:
            if part in ("", "."):
                continue
            step = os.path.join(step, part)
            if os.path.islink(step):
                allowed.append(os.path.realpath(step))
    return any(_within(real, a) for a in allowed)


def folder_link_allowed(link: str, roots: Iterable[str], policy: LinkPolicy) -> bool:
    """Whether the scan may follow the folder link `link` under `policy` (loops aside)."""
    if policy != "none":
        return True
    real = os.path.realpath(link)
    return any(_within(real, os.path.realpath(r)) for r in roots)
