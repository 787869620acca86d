"""How a run tells its caller what it does, as it goes: one record for the indexer, the
recaptioner and the re-indexer (the CLI's progress bars and messages; the watcher logs instead,
and tests collect). Each field is a callback; a run told nothing calls nothing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


def _count(n: int) -> None:
    """The default for a count nobody asked for."""


def _note(what: str, why: str) -> None:
    """The default for a message nobody asked for."""


@dataclass(frozen=True)
class Report:
    total: Callable[[int], None] = _count  # how many items the run will handle, once it knows
    done: Callable[[int], None] = _count  # n more items handled
    skipped: Callable[[str, str], None] = _note  # (a path, or what else was left out; why)
    caption_failed: Callable[[str, str], None] = _note  # (a path; why): kept, without a caption
