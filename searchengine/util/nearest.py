"""The nearest existing name to a mistyped one: a folder on disk (`index ~/Pictrues`) or an
indexed folder (a folder filter that matches none). Only ever asked on the error path."""

from __future__ import annotations

import difflib
import os

CUTOFF = 0.6  # difflib's ratio below which a name is no suggestion


def _closest(name: str, choices: list[str]) -> str | None:
    """The choice nearest to `name`, in any case; None when none is near."""
    by_lower: dict[str, str] = {}
    for choice in choices:
        by_lower.setdefault(choice.lower(), choice)
    found = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=CUTOFF)
    return by_lower[found[0]] if found else None


def _subfolders(folder: str) -> list[str]:
    try:
        with os.scandir(folder) as entries:
            return [e.name for e in entries if e.is_dir(follow_symlinks=True) and not e.name.startswith(".")]
    except OSError:
        return []


def folder_on_disk(typed: str) -> str | None:
    """The existing folder nearest to `typed`, a path that does not exist, written as it was
    typed (`~/Pictrues/Trips` -> `~/Pictures/Trips`): from its deepest existing parent down,
    each missing part replaced by the nearest subfolder's name. None where a part has none."""
    expanded = os.path.abspath(os.path.expanduser(typed))
    missing: list[str] = []
    base = expanded
    while not os.path.isdir(base):
        parent, name = os.path.split(base)
        if parent == base:
            return None
        missing.append(name)
        base = parent
    if not missing:
        return None  # it exists (perhaps as a file): nothing to suggest
    for name in reversed(missing):
        nearest = _closest(name, _subfolders(base))
        if nearest is None:
            return None
        base = os.path.join(base, nearest)
    if typed.startswith("~"):
        home = os.path.expanduser("~")
        if base == home or base.startswith(home + os.sep):
            return "~" + base[len(home):]
    return base if os.path.isabs(os.path.expanduser(typed)) else os.path.relpath(base)


def indexed_folder(typed: str, folders: list[str]) -> str | None:
    """The indexed folder nearest to a folder filter that matches none. An absolute or
    home-relative filter is compared with whole paths, a name (`Trps`, `Trips/Wintr`) with
    each folder's last parts, as many as it has. Returns the folder's full path."""
    text = typed.strip().rstrip("/")
    if not text:
        return None
    if text.startswith(("/", "~")):
        return _closest(os.path.expanduser(text), folders)
    depth = len([p for p in text.split("/") if p])
    tails: dict[str, str] = {}
    for folder in folders:
        parts = [p for p in folder.split("/") if p]
        if len(parts) >= depth:
            tails.setdefault("/".join(parts[-depth:]).lower(), folder)
    nearest = _closest(text.lower(), list(tails))
    return tails[nearest] if nearest is not None else None


def did_you_mean(suggestion: str | None) -> str:
    """'; did you mean '...'?' or nothing."""
    return f"; did you mean {suggestion!r}?" if suggestion else ""


def missing_folder(typed: str) -> str:
    """The message for a folder that does not exist, with the nearest one that does."""
    return f"folder {typed!r} does not exist{did_you_mean(folder_on_disk(typed))}"
