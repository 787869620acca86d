"""The indexer: scan the folders, then drive the stages of `searchengine.indexing.stages` locally.

    scan -> read + hash (threads) -> known content? (one query per batch) -> decode +
    preprocess + thumbnail (threads) -> embed -> caption (batches) -> Library.write_batch

Reading and decoding run in thread pools (PIL and hashlib release the GIL), a bounded window
ahead of the model, so they overlap model compute. Each image is decoded once: the retrieval
model's pixels, the captioner's pixels and the thumbnail all come from that one decode; a
file whose content is indexed already is linked without being decoded. A caption that fails
leaves the image indexed, with the reason recorded. Results are consumed in scan order. Each
model batch is committed through the Library in one transaction; see `searchengine.library`
for the write order that makes a crash repairable.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as NotYet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence, TypeVar

from searchengine.indexing.batches import Batch, Sorter
from searchengine.indexing.scan import BAD_NAME, LINK_DUPLICATE, LINK_LOOP, LINK_OUTSIDE, FileEntry, printable, scan_folder, storable
from searchengine.indexing.report import Report
from searchengine.indexing.stages import (
    CaptionStage, Decoded, Embedded, EmbedStage, Failed, Known, Read, ReadStage, decode_stage, index_batch_size,
)
from searchengine.media import links
from searchengine.util import nearest
from searchengine.models.captioner import Captioner
from searchengine.errors import SearchEngineError, Stopped
from searchengine.media.imageio import read_file
from searchengine.library import Library, NewImage, model_info
from searchengine.models.retrieval import RetrievalModel
from searchengine.config.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
Scanner = Callable[..., Iterator[FileEntry]]

LINK_MESSAGES = {
    LINK_LOOP: "folder link not followed: it leads back to a folder that contains it",
    LINK_DUPLICATE: "folder link not followed: its folder is already listed under another path",
}
Reader = Callable[[str], bytes]


@dataclass
class Summary:
    indexed: int = 0  # newly embedded images
    captioned: int = 0
    caption_failed: int = 0
    linked: int = 0  # files whose content was already indexed under another path
    moved: int = 0  # files that left one path and appeared under another (renames, moves)
    unchanged: int = 0
    removed: int = 0  # files gone from disk, dropped from the index
    failed: Counter = field(default_factory=Counter)  # reason -> count, this run
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # path, reason, message
    links_skipped: int = 0  # symlinked folders not followed: loops, or folders listed under another path
    links_outside: int = 0  # links not followed because they lead outside the library (searchengine.media.links)
    kept_absent: int = 0  # files kept because their folder is absent (unmounted), not empty (`Indexer.absent`)
    seconds: float = 0.0
    # Where the time went: "read" and "decode" are seconds summed over the decode threads,
    # "model" and "captions" wall seconds of the model lane, "write" of the runner's thread;
    # they overlap each other.
    time: Counter = field(default_factory=Counter)
    # (what, path) of every file handled, when asked for (the watcher logs each); a full
    # run leaves it off, so a million-file scan keeps no per-file list.
    record: bool = False
    changes: list[tuple[str, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_time(self, what: str, seconds: float) -> None:
        """Time spent on `what`, from any of the run's threads."""
        with self._lock:
            self.time[what] += seconds

    def note(self, what: str, path: str) -> None:
        if self.record:
            self.changes.append((what, path))

    @property
    def skipped(self) -> int:
        return sum(self.failed.values())


def map_ahead(fn: Callable[[T], R], items: Iterable[T], workers: int, window: int) -> Iterator[R]:
    """`fn` over `items` in a thread pool, at most `window` ahead of the consumer, in order.
    Closed early (the consumer stopped), it waits for nothing: what is queued is dropped and
    what runs is left to end on its own."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")
    futures: deque[Future] = deque()
    finished = False
    try:
        for item in items:
            futures.append(pool.submit(fn, item))
            if len(futures) >= window:
                yield futures.popleft().result()
        while futures:
            yield futures.popleft().result()
        finished = True
    finally:
        pool.shutdown(wait=finished, cancel_futures=True)


class Runner(Protocol):
    """What drives a run's stages: where the folders are listed and where the files go
    through read, decode, the models and the write (`Indexer.commit_batch`, on the driver)."""

    def listings(self, scanner: Scanner, folders: Sequence[Path], **listing) -> Iterable[tuple[Path, Iterable[FileEntry]]]:
        """(folder, its entries) for each folder."""
        ...

    def process(self, indexer: "Indexer", todo: list[FileEntry], summary: Summary) -> list[tuple[str, str]]:
        """Embed, link or record every file of `todo`; (path, sha256) of those linked."""
        ...


class LocalRunner:
    """This process: folders listed here, the stages on its threads (`Indexer.process_here`)."""

    def listings(self, scanner: Scanner, folders: Sequence[Path], **listing) -> Iterable[tuple[Path, Iterable[FileEntry]]]:
        return ((folder, scanner(folder, **listing)) for folder in folders)

    def process(self, indexer: "Indexer", todo: list[FileEntry], summary: Summary) -> list[tuple[str, str]]:
        return indexer.process_here(todo, summary)


class Indexer:
    def __init__(
        self,
        model: RetrievalModel,
        library: Library,
        settings: Settings,
        *,
        scanner: Scanner = scan_folder,
        reader: Reader = read_file,
        report: Report = Report(),
        captioner: Captioner | None = None,
        runner: "Runner | None" = None,
        prune: bool = False,
    ) -> None:
        self.prune = prune  # scan folders that look absent (unmounted) as they are: their files leave
        self._stopping = threading.Event()  # see `stop`
        self.model = model
        self.captioner = captioner
        # What drives the stages (a `Runner`): this process's threads, or a cluster's
        # (`searchengine.indexing.ray_runner.RayRunner`).
        self.runner: Runner = runner if runner is not None else LocalRunner()
        self.library = library
        self.settings = settings
        self.scanner = scanner
        self.report = report
        library.require_writable("indexing writes to it")
        self.library.bind(model_info(model), model.former_fingerprints)
        self._made_by: set[str] = set()  # how the models that made this run's vectors ran, as recorded
        self.batch_size = index_batch_size(model, settings, captioner.bytes_per_image() if captioner is not None else 0)
        self.read_stage = ReadStage(reader)
        self.decode_stage = decode_stage(
            model, settings, library.thumbnail_format, captioner.preprocessor if captioner is not None else None,
        )
        self.embed_stage = EmbedStage(model, keep_vit=settings.writes_feature_cache(model.device) and library.keeps_features)
        self.caption_stage = CaptionStage(captioner) if captioner is not None else None

    # -- the run --------------------------------------------------------------------------

    def run(self, roots: Sequence[str | os.PathLike]) -> Summary:
        start = time.perf_counter()
        summary = Summary()
        library = self.library
        folders = [self._check_root(r) for r in roots]
        todo: list[FileEntry] = []
        gone: list[str] = []

        def skipped_link(path: str, reason: str) -> None:
            if reason == LINK_OUTSIDE:
                summary.links_outside += 1
                # A folder link leads outside only under the `none` policy; a file link under `folders` too.
                self.report.skipped(path, links.OUTSIDE_FOLDER_MESSAGE if os.path.isdir(path) else links.OUTSIDE_MESSAGE)
            else:
                summary.links_skipped += 1
                self.report.skipped(path, LINK_MESSAGES[reason])

        self.library.record_link_policy()
        policy = self.library.link_policy
        for folder in folders:
            library.add_root(str(folder))
        library_roots = tuple(Path(r) for r in library.catalog.roots())
        exclude = (Path(self.settings.data_dir).resolve(),)
        listing = dict(exclude=exclude, on_skipped_link=skipped_link, links=policy, roots=library_roots)
        listings = self.runner.listings(self.scanner, folders, **listing)  # on a cluster: listed there
        for folder, entries in listings:
            known = library.catalog.files_under(str(folder))
            why = self.absent(folder, len(known))
            if why is not None:  # an unmounted disk is not an emptied one: nothing leaves
                summary.kept_absent += len(known)
                self.report.skipped(str(folder), f"{why}; its {len(known)} indexed files stay in the index until it is back "
                             f"(searchengine index --prune {folder} drops them)")
                continue
            library.record_mount(str(folder), os.path.ismount(folder))
            seen: set[str] = set()
            bad_names: list[tuple[str, int, int, str, str]] = []
            for entry in entries:
                if not storable(entry.path):  # one bad name is skipped, never the end of the run
                    shown = printable(entry.path)
                    summary.failed["bad_name"] += 1
                    summary.failures.append((shown, "bad_name", BAD_NAME))
                    summary.note("skipped", f"{shown}: {BAD_NAME}")
                    self.report.skipped(shown, BAD_NAME)
                    # Recorded under its name with the bytes escaped, so that `stats` lists it
                    # (and drops it once the file is renamed); never read by that name.
                    seen.add(shown)
                    if not (shown in known and known[shown].status == "failed" and known[shown].size == entry.size
                            and known[shown].mtime_ns == entry.mtime_ns):
                        bad_names.append((shown, entry.size, entry.mtime_ns, "bad_name", BAD_NAME))
                    continue
                seen.add(entry.path)
                state = known.get(entry.path)
                if state is not None and state.size == entry.size and state.mtime_ns == entry.mtime_ns:
                    summary.unchanged += 1
                else:
                    todo.append(entry)
            gone.extend(p for p in known if p not in seen)
            if bad_names:
                library.write_batch(failures=bad_names)
        self.report.total(len(todo))
        self.update(todo, gone, summary)
        # A library that outgrew its vector index's tier is re-indexed before the run ends
        # (a watcher's is, in the background).
        library.maybe_retier(wait=True)
        summary.seconds = time.perf_counter() - start
        return summary

    def update(self, changed: Sequence[FileEntry], removed: Sequence[str], summary: Summary | None = None) -> Summary:
        """Index new or changed files, then forget removed paths (the watcher's entry point).

        Additions go first: a moved file's new path links to its content, still in the store
        under the old path, so the image keeps its id, vectors and caption; only then does the
        old path go.
        """
        summary = summary if summary is not None else Summary()
        try:
            todo = list(changed)
            linked = self.runner.process(self, todo, summary)
            if removed:
                before = self.library.catalog.hashes_of(removed)
                self.library.remove_files(removed)
                self._count_moves(removed, before, linked, summary)
        finally:
            self.library.save()
        return summary

    @staticmethod
    def _count_moves(removed: Sequence[str], before: dict[str, str], linked: list[tuple[str, str]], summary: Summary) -> None:
        """A removed path whose content was linked under a new path in the same update moved:
        count it once as moved, rather than as a duplicate linked plus a removal."""
        arrivals: dict[str, list[str]] = {}
        for path, sha in linked:
            arrivals.setdefault(sha, []).append(path)
        for path in removed:
            new_paths = arrivals.get(before.get(path, ""))
            if new_paths:
                summary.moved += 1
                summary.linked -= 1
                summary.note("moved", f"{path} -> {new_paths.pop(0)}")
            else:
                summary.removed += 1
                summary.note("removed", path)

    def absent(self, folder: str | os.PathLike, indexed: int) -> str | None:
        """Why a library folder with `indexed` files counts as absent rather than emptied
        (None: it is there, scanned as it is). A disk unmounted from its mount point leaves an
        empty folder behind, which a scan would read as "every photo deleted": every image
        would leave, and come back with new ids and new captions at the remount. So a folder
        that was a mount point and is not one now, or that has no entry at all while the index
        has files in it, is absent, and its images stay. `prune` (index --prune) scans it as it
        is, to drop a folder on purpose."""
        if self.prune or not indexed:
            return None
        folder = str(folder)
        if not os.path.isdir(folder):
            return f"folder {folder} is not there now (unmounted?)"
        if folder in self.library.catalog.mounted_roots() and not os.path.ismount(folder):
            return f"folder {folder} was a mount point and is not one now (unmounted?)"
        try:
            with os.scandir(folder) as it:
                empty = next(it, None) is None
        except OSError as e:
            return f"folder {folder} cannot be read now ({e.strerror or e})"
        return f"folder {folder} is empty now (an unmounted disk?)" if empty else None

    def _check_root(self, root: str | os.PathLike) -> Path:
        path = Path(root).expanduser()
        if not storable(str(path)):
            raise SearchEngineError(f"the folder name {printable(str(path))!r} is not valid UTF-8; rename it to index it")
        if not path.exists():
            raise SearchEngineError(nearest.missing_folder(str(root)))
        if not path.is_dir():
            raise SearchEngineError(f"{str(root)!r} is not a folder")
        return path.resolve()

    def process_here(self, todo: list[FileEntry], summary: Summary) -> list[tuple[str, str]]:
        """Embed, link or record every file; return (path, sha256) of the files linked to
        content already indexed (a move's arrival is among them).

        The local runner of the stages in `searchengine.indexing.stages`: reads and decodes run in threads,
        a bounded window ahead of the model; whether content is indexed already is asked once
        per batch of reads, so a known file is never decoded. The models run in their own
        thread (the model lane), one batch at a time: while batch k+1 is embedded and
        captioned there, this thread commits batch k through the Library in one transaction
        and gathers batch k+2, whose pixels start on their way to the device (on a GPU) before
        batch k+1 is done. Only this thread touches the Library.
        """
        linked: list[tuple[str, str]] = []
        # Content embedded in this run, committed or still on its way: a copy of it that the
        # decode threads read before that commit is linked, not embedded a second time.
        sorter = Sorter(self.batch_size, lambda failed: self.record_failure(failed, summary))
        pending: list[tuple[Future, Batch]] = []  # at most one batch in the lane

        def commit() -> None:
            future, b = pending.pop()
            while True:  # a batch takes seconds on a CPU: `stop` is heard while it runs
                try:
                    embedded = future.result(timeout=0.1)
                    break  # done: written, stopping or not (it takes milliseconds)
                except NotYet:
                    if self._stopping.is_set():
                        raise Stopped from None
            self.commit_batch(embedded, b.known, b.failed, summary)
            linked.extend((x.entry.path, x.sha256) for x in b.known)
            self.report.done(len(embedded) + len(b.known) + len(b.failed))

        workers, window = self.settings.decode_threads, 2 * self.batch_size + self.settings.decode_threads
        def timed(stage, name: str):
            def run(item):
                t = time.perf_counter()
                try:
                    return stage(item)
                finally:
                    summary.add_time(name, time.perf_counter() - t)

            return run

        lane = ThreadPoolExecutor(1, thread_name_prefix="model")
        finished = False
        reads = decoded = None
        try:

            def flush(b: Batch) -> None:
                if not b:
                    return
                staged = self.embed_stage.stage(b.new)  # on a GPU: the copy starts now
                future = lane.submit(self._compute, b.new, staged, summary)
                if pending:
                    commit()  # the batch before, written while this one computes
                pending.append((future, b))

            reads = map_ahead(timed(self.read_stage, "read"), todo, workers, window)
            decoded = map_ahead(timed(self.decode_stage, "decode"), self._known_content(reads), workers, window)
            for result in decoded:
                if self._stopping.is_set():
                    raise Stopped
                full = sorter.add(result)
                if full is not None:
                    flush(full)
            flush(sorter.rest())
            if pending:
                commit()
            finished = True
        finally:
            # Stopped early (Ctrl-C, `stop`, an error): the batch in the lane is not written,
            # and nothing waits for it, nor for the decodes on their way. A model batch takes
            # seconds on a CPU; waiting for it kept Ctrl-C from ending `index` for 8-18 s.
            for gen in (decoded, reads):
                if gen is not None:
                    gen.close()
            lane.shutdown(wait=finished, cancel_futures=True)
        return linked

    def stop(self) -> None:
        """End the run in progress (from another thread): `Stopped` is raised in the thread
        that runs it before the next file is taken, or while it waits for a model batch; a
        batch the models have finished is still written."""
        self._stopping.set()

    def _known_content(self, reads: Iterable[Read | Failed]) -> Iterator[Read | Known | Failed]:
        """Reads whose content the library has already become Known (not decoded): one
        question to the library per batch of reads."""
        chunk: list[Read | Failed] = []

        def settle() -> Iterator[Read | Known | Failed]:
            have = self.library.catalog.indexed_hashes(r.sha256 for r in chunk if isinstance(r, Read) and r.sha256)
            for r in chunk:
                yield Known(r.entry, r.sha256) if isinstance(r, Read) and r.sha256 in have else r
            chunk.clear()

        for read in reads:
            chunk.append(read)
            if len(chunk) >= self.batch_size:
                yield from settle()
        yield from settle()

    def record_failure(self, failed: Failed, summary: Summary) -> None:
        """A file that could not be read or decoded: counted, listed, and told to `report.skipped`."""
        summary.failed[failed.reason] += 1
        summary.failures.append((failed.entry.path, failed.reason, failed.message))
        summary.note("skipped", f"{failed.entry.path}: {failed.message}")
        self.report.skipped(failed.entry.path, failed.message)

    def _compute(self, batch: list[Decoded], staged, summary: Summary) -> list[Embedded]:
        """The model lane's work on one batch: embed, then caption (wall seconds of the lane)."""
        t0 = time.perf_counter()
        embedded = self.embed_stage(batch, staged)
        t1 = time.perf_counter()
        if embedded and self.caption_stage is not None:
            embedded = self.caption_stage(embedded)
        summary.add_time("model", t1 - t0)
        summary.add_time("captions", time.perf_counter() - t1)
        return embedded

    def commit_batch(self, embedded: list[Embedded], known: list[Known], failures: list[Failed], summary: Summary) -> None:
        if not (embedded or known or failures):
            return
        t = time.perf_counter()
        if self.caption_stage is not None:
            for e in embedded:
                self._count_caption(e, summary)
        self.library.write_batch(
            new=[
                NewImage(e.item.sha256, e.meta, e.itc, e.vit, e.item.thumbnail, (e.entry.path, e.entry.size, e.entry.mtime_ns))
                for e in embedded
            ],
            links=[(k.entry.path, k.entry.size, k.entry.mtime_ns, k.sha256) for k in known],
            failures=[(f.entry.path, f.entry.size, f.entry.mtime_ns, f.reason, f.message) for f in failures],
        )
        # A Ray run's actors load the model in their own dtype and device, maybe not this one's.
        for made_by in {e.made_by for e in embedded if e.made_by} - self._made_by:
            self.library.record_made_by(made_by)
            self._made_by.add(made_by)
        summary.add_time("write", time.perf_counter() - t)
        summary.indexed += len(embedded)
        summary.linked += len(known)
        for e in embedded:
            summary.note("indexed", e.entry.path)
        for k in known:
            summary.note("linked", k.entry.path)

    def _count_caption(self, e: Embedded, summary: Summary) -> None:
        if e.meta.caption is not None:
            summary.captioned += 1
        else:
            summary.caption_failed += 1
            summary.note("no caption", f"{e.entry.path}: {e.meta.caption_error}")
            self.report.caption_failed(e.entry.path, e.meta.caption_error)
