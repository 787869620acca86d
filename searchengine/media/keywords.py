"""Keyword queries and the words an image is known by (caption, file name, folder names).

Query syntax, the same in every mode:
- plain words: any of them may match; an image matching more of them ranks higher;
- `"quoted phrases"`: must match, words adjacent and in this order (keyword side);
- `-word` and `-"a phrase"`: images whose words match are left out (every side).
Common English words ("a", "the", "of", ...) are dropped from the plain words unless nothing
else is left. The text encoder gets the query with the quote marks and exclusions removed.

Nothing here knows a database: `searchengine.store.textindex` compiles a `KeywordQuery` into its
backend's full-text syntax.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import PurePosixPath
from typing import Iterable, Sequence

STOP_WORDS = frozenset(
    """a an and are as at be by for from has have in is it its of on or that the this to was
    were with my our your his her their me we you i""".split()
)

_TOKEN = re.compile(r'(-?)"([^"]*)"?|(\S+)')
_WORD = re.compile(r"[^\W_]+")  # letters and digits; "_" splits, as in FTS5
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Za-z])(?=[0-9])|(?<=[0-9])(?=[A-Za-z])")

Clause = tuple[str, ...]  # words that must appear together, in order (one word: just that word)


def words(text: str) -> list[str]:
    """Lower-case words (letters and digits) of a text."""
    return [w.lower() for w in _WORD.findall(text)]


@dataclass(frozen=True)
class KeywordQuery:
    optional: tuple[Clause, ...] = ()  # plain words (or hyphenated/underscored groups): any may match
    required: tuple[Clause, ...] = ()  # quoted phrases: all must match
    excluded: tuple[Clause, ...] = ()  # -word / -"phrase": none may match
    semantic_text: str = ""

    @property
    def clauses(self) -> tuple[Clause, ...]:
        """What an image is scored on: the share of these it matches."""
        return self.required + self.optional

    @property
    def searchable(self) -> bool:
        return bool(self.clauses)


def parse_query(text: str) -> KeywordQuery:
    optional: list[Clause] = []
    required: list[Clause] = []
    excluded: list[Clause] = []
    semantic: list[str] = []
    for m in _TOKEN.finditer(text or ""):
        negated, quoted, plain = m.group(1), m.group(2), m.group(3)
        if quoted is not None:
            clause = tuple(words(quoted))
            if clause:
                (excluded if negated else required).append(clause)
            if not negated:
                semantic.append(quoted.strip())
            continue
        if plain.startswith("-") and len(plain) > 1 and words(plain):
            excluded.append(tuple(words(plain)))
            continue
        clause = tuple(words(plain))
        if clause:
            optional.append(clause)
        semantic.append(plain)
    content = [c for c in optional if not (len(c) == 1 and c[0] in STOP_WORDS)]
    optional = content or optional
    return KeywordQuery(
        optional=tuple(dict.fromkeys(optional)),
        required=tuple(dict.fromkeys(required)),
        excluded=tuple(dict.fromkeys(excluded)),
        semantic_text=" ".join(s for s in semantic if s),
    )


def path_words(paths: Iterable[str], roots: Sequence[str]) -> str:
    """The words of an image's folder and file names, for keyword search.

    Folders count from the library root's own name down (`/home/me/Pictures/Trip/IMG_01.jpg`
    under root `/home/me/Pictures` gives pictures, trip, img, 01); the extension is left out,
    and so are the folders above the root, which every image shares. CamelCase and
    letter/digit runs are split too (`BeachDay2023` gives beachday2023, beach, day, 2023).
    """
    out: dict[str, None] = {}
    for path in paths:
        if "//" in path or "/./" in path or path.endswith(("/", "/.")) or not path.startswith("/"):
            p = PurePosixPath(path)  # the unusual spellings, normalised as pathlib does
            folder, name = str(p.parent), p.name
        else:
            folder, _, name = path.rpartition("/")
        root = max((r for r in roots if path.startswith(r.rstrip("/") + "/")), key=len, default=None)
        dot = name.rfind(".")
        stem = name[:dot] if 0 < dot < len(name) - 1 else name  # PurePosixPath.stem
        for w in (*_folder_words(folder or "/", root), *_part_words(stem)):
            out.setdefault(w, None)
    return " ".join(out)


@lru_cache(maxsize=4096)
def _folder_words(folder: str, root: str | None) -> tuple[str, ...]:
    """The words of a folder's names from `root`'s own name down (the last two without a
    root); a library's images share a few folders, so the writer works each out once."""
    p = PurePosixPath(folder)
    if root is None:
        parts = list(p.parts[-2:])
    else:  # a path that pathlib normalises to the root itself (`/root/.`) has no folder below it
        parts = [PurePosixPath(root).name, *(p.relative_to(root).parts if p.is_relative_to(root) else ())]
    return tuple(w for part in parts for w in _part_words(part))


def _part_words(part: str) -> list[str]:
    return words(part) + words(_CAMEL.sub(" ", part))
