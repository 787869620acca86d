"""How stage results become batches: one rule for every loop that feeds the models or the
library (the local runner, the Ray runner, recaptioning, evaluation).

A batch is full at `batch_size` items the model works on, or at `OTHERS_MAX` items in all
(links and failures cost the model nothing, but a batch of them is still one commit), so a
folder of copies is written as it goes rather than in one transaction at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

from searchengine.indexing.stages import Embedded, Failed, Known

OTHERS_MAX = 256

T = TypeVar("T")


def batched(items: Iterable[T], size: int, *, counts: Callable[[T], bool] = lambda item: True,
            limit: int = OTHERS_MAX) -> Iterator[list[T]]:
    """`items` in lists of `size` that `counts` (those the model works on), or of `limit` in
    all, whichever comes first; the last list holds what is left (never empty)."""
    batch: list[T] = []
    counted = 0
    for item in items:
        batch.append(item)
        counted += bool(counts(item))
        if counted >= size or len(batch) >= limit:
            yield batch
            batch, counted = [], 0
    if batch:
        yield batch


@dataclass
class Batch:
    """One commit's worth: new images (decoded, or embedded already), files whose content is
    indexed already or earlier in this run (linked), and files that failed."""

    new: list = field(default_factory=list)
    known: list[Known] = field(default_factory=list)
    failed: list[Failed] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.new or self.known or self.failed)

    def __len__(self) -> int:
        return len(self.new) + len(self.known) + len(self.failed)


class Sorter:
    """Sorts stage results, one at a time, into the batch being gathered: `add` returns the
    batch when it is full, `rest` what is left at the end. Content seen before in this run
    (a copy read before the first was committed) is linked, never embedded twice. Each
    failure is told to `on_failed` as it comes."""

    def __init__(self, batch_size: int, on_failed: Callable[[Failed], None]) -> None:
        self.batch_size = batch_size
        self.on_failed = on_failed
        self.seen: set[str] = set()
        self.batch = Batch()

    def add(self, result) -> Batch | None:
        b = self.batch
        if isinstance(result, Failed):
            b.failed.append(result)
            self.on_failed(result)
        elif isinstance(result, Known):
            b.known.append(result)
        else:
            sha256 = result.item.sha256 if isinstance(result, Embedded) else result.sha256
            if sha256 in self.seen:
                b.known.append(Known(result.entry, sha256))
            else:
                b.new.append(result)
                self.seen.add(sha256)
        if len(b.new) >= self.batch_size or len(b.known) + len(b.failed) >= OTHERS_MAX:
            return self.rest()
        return None

    def rest(self) -> Batch:
        full, self.batch = self.batch, Batch()
        return full
