"""The indexing pipeline: scan -> read + hash + decode + preprocess (threads) -> embed + caption (batches) -> write.

Reading, decoding and preprocessing run in a thread pool (PIL releases the GIL), a bounded
window ahead of the model, so decoding overlaps model compute. Each image is decoded once:
the retrieval model's pixels, the captioner's pixels and the thumbnail all come from that one
decode. A caption that fails leaves the image indexed, with the reason recorded. Results are
consumed in scan order. Each model batch is committed to the store in one transaction; see
`searchengine.library` for the write order that makes a crash repairable.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

from indexer.scan import BAD_NAME, LINK_DUPLICATE, LINK_LOOP, LINK_OUTSIDE, FileEntry, printable, scan_folder, storable
from searchengine import links
from searchengine.captions import Caption, Captioner
from searchengine.imageio import Decoded, decode_image, read_file, sha256_of
from searchengine.errors import BadImageError, ReadOnlyIndexError, SearchEngineError
from searchengine.library import Library, model_info
from searchengine.models import RetrievalModel
from searchengine.settings import Settings

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
    links_outside: int = 0  # links not followed because they lead outside the library (searchengine.links)
    seconds: float = 0.0
    # (what, path) of every file handled, when asked for (the watcher logs each); a full
    # run leaves it off, so a million-file scan keeps no per-file list.
    record: bool = False
    changes: list[tuple[str, str]] = field(default_factory=list)

    def note(self, what: str, path: str) -> None:
        if self.record:
            self.changes.append((what, path))

    @property
    def skipped(self) -> int:
        return sum(self.failed.values())


@dataclass
class _Ready:
    entry: FileEntry
    sha256: str
    decoded: Decoded | None = None  # None: content already in the store (link, no decode)
    pixels: object = None
    thumbnail: bytes | None = None
    caption_pixels: object = None
    caption_error: str | None = None


@dataclass
class _Failed:
    entry: FileEntry
    reason: str
    message: str


def map_ahead(fn: Callable[[T], R], items: Iterable[T], workers: int, window: int) -> Iterator[R]:
    """`fn` over `items` in a thread pool, at most `window` ahead of the consumer, in order."""
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        futures: deque[Future] = deque()
        for item in items:
            futures.append(pool.submit(fn, item))
            if len(futures) >= window:
                yield futures.popleft().result()
        while futures:
            yield futures.popleft().result()


class Indexer:
    def __init__(
        self,
        model: RetrievalModel,
        library: Library,
        settings: Settings,
        *,
        scanner: Scanner = scan_folder,
        reader: Reader = read_file,
        on_skip: Callable[[str, str], None] | None = None,
        progress: Callable[[int], None] | None = None,
        on_total: Callable[[int], None] | None = None,
        captioner: Captioner | None = None,
        on_caption_error: Callable[[str, str], None] | None = None,
    ) -> None:
        self.model = model
        self.captioner = captioner
        self.library = library
        self.settings = settings
        self.scanner = scanner
        self.reader = reader
        self.on_skip = on_skip or (lambda path, message: None)
        self.on_caption_error = on_caption_error or (lambda path, message: None)
        self.progress = progress or (lambda n: None)
        self.on_total = on_total or (lambda n: None)
        if not library.writable:
            Library.check_writable(settings)  # names the path that cannot be written
            raise ReadOnlyIndexError(f"the index in {settings.data_dir} was opened read-only; indexing writes to it")
        self.library.bind(model_info(model))
        self.batch_size = settings.batch_size or (64 if model.device.startswith("cuda") else 8)
        self.write_features = settings.writes_feature_cache(model.device)

    # -- the run --------------------------------------------------------------------------

    def run(self, roots: Sequence[str | os.PathLike]) -> Summary:
        start = time.perf_counter()
        summary = Summary()
        store = self.library.store
        folders = [self._check_root(r) for r in roots]
        todo: list[FileEntry] = []
        gone: list[str] = []

        def skipped_link(path: str, reason: str) -> None:
            if reason == LINK_OUTSIDE:
                summary.links_outside += 1
                # A folder link leads outside only under the `none` policy; a file link under `folders` too.
                self.on_skip(path, links.OUTSIDE_FOLDER_MESSAGE if os.path.isdir(path) else links.OUTSIDE_MESSAGE)
            else:
                summary.links_skipped += 1
                self.on_skip(path, LINK_MESSAGES[reason])

        self.library.record_link_policy()
        policy = self.library.link_policy
        for folder in folders:
            store.add_root(str(folder))
        library_roots = tuple(Path(r) for r in store.roots())
        for folder in folders:
            known = store.files_under(str(folder))
            seen: set[str] = set()
            exclude = (Path(self.settings.data_dir).resolve(),)
            for entry in self.scanner(folder, exclude=exclude, on_skipped_link=skipped_link, links=policy, roots=library_roots):
                if not storable(entry.path):  # one bad name is skipped, never the end of the run
                    shown = printable(entry.path)
                    summary.failed["bad_name"] += 1
                    summary.failures.append((shown, "bad_name", BAD_NAME))
                    summary.note("skipped", f"{shown}: {BAD_NAME}")
                    self.on_skip(shown, BAD_NAME)
                    continue
                seen.add(entry.path)
                state = known.get(entry.path)
                if state is not None and state.size == entry.size and state.mtime_ns == entry.mtime_ns:
                    summary.unchanged += 1
                else:
                    todo.append(entry)
            gone.extend(p for p in known if p not in seen)
        self.on_total(len(todo))
        self.update(todo, gone, summary)
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
            linked = self._process(list(changed), summary)
            if removed:
                store = self.library.store
                before = store.hashes_of(removed)
                self.library.forget_images(store.remove_files(removed))
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

    def _check_root(self, root: str | os.PathLike) -> Path:
        path = Path(root).expanduser()
        if not storable(str(path)):
            raise SearchEngineError(f"the folder name {printable(str(path))!r} is not valid UTF-8; rename it to index it")
        if not path.exists():
            raise SearchEngineError(f"folder {str(root)!r} does not exist")
        if not path.is_dir():
            raise SearchEngineError(f"{str(root)!r} is not a folder")
        return path.resolve()

    def _process(self, todo: list[FileEntry], summary: Summary) -> list[tuple[str, str]]:
        """Embed, link or record every file; return (path, sha256) of the files linked to
        content already indexed (a move's arrival is among them)."""
        linked: list[tuple[str, str]] = []
        batch: list[_Ready] = []
        links: list[_Ready] = []
        failures: list[_Failed] = []
        # Content embedded in this run, committed or still in `batch`: a copy of it that the
        # decode threads read before that commit is linked, not embedded a second time.
        embedded: set[str] = set()

        def flush() -> None:
            self._write(batch, links, failures, summary)
            linked.extend((r.entry.path, r.sha256) for r in links)
            self.progress(len(batch) + len(links) + len(failures))
            batch.clear(), links.clear(), failures.clear()

        for result in self._load_all(todo):
            if isinstance(result, _Failed):
                failures.append(result)
                summary.failed[result.reason] += 1
                summary.failures.append((result.entry.path, result.reason, result.message))
                summary.note("skipped", f"{result.entry.path}: {result.message}")
                self.on_skip(result.entry.path, result.message)
            elif result.decoded is None or result.sha256 in embedded:
                links.append(result)
            else:
                batch.append(result)
                embedded.add(result.sha256)
            if len(batch) >= self.batch_size or len(links) + len(failures) >= 256:
                flush()
        flush()
        return linked

    def _load_all(self, todo: list[FileEntry]) -> Iterator[_Ready | _Failed]:
        return map_ahead(self._load, todo, self.settings.decode_workers, 2 * self.batch_size + self.settings.decode_workers)

    def _load(self, entry: FileEntry) -> _Ready | _Failed:
        try:
            data = self.reader(entry.path)
            sha = sha256_of(data) if data else ""
            if sha and self.library.store.image_id_for_hash(sha) is not None:
                return _Ready(entry, sha)
            decoded = decode_image(data, max_pixels=self.settings.max_image_pixels, sha256=sha or None)
            pixels = self.model.preprocess([decoded.image])[0]
            # Decoded once, used thrice; the thumbnail shows transparency, the models do not.
            thumbnail = self.library.thumbnails.make(decoded.display)
            ready = _Ready(entry, sha, decoded, pixels, thumbnail)
            if self.captioner is not None:
                try:
                    ready.caption_pixels = self.captioner.preprocess([decoded.image])[0]
                except Exception as e:  # noqa: BLE001 - the image is still embedded
                    ready.caption_error = f"{type(e).__name__}: {e}"
            decoded.image = decoded.rgba = None  # keep the pixels and the thumbnail; free the full-size image
            return ready
        except BadImageError as e:
            return _Failed(entry, e.reason, str(e))
        except MemoryError:
            return _Failed(entry, "too_large", "not enough memory to decode this image")
        except Exception as e:  # a decoder bug on one file must not stop the run
            log.exception("unexpected error reading %s", entry.path)
            return _Failed(entry, "decode_error", f"{type(e).__name__}: {e}")

    def _write(self, batch: list[_Ready], links: list[_Ready], failures: list[_Failed], summary: Summary) -> None:
        import torch

        if not (batch or links or failures):
            return
        itc = vit = None
        if batch:
            emb = self.model.embed_pixels(torch.stack([r.pixels for r in batch]))
            itc, vit = emb.itc, emb.vit
            if self.captioner is not None:
                self._caption(batch, summary)
        store = self.library.store
        new_ids, orphans = store.write_batch(
            new_images=[
                (r.sha256, r.decoded.meta, itc[i], [(r.entry.path, r.entry.size, r.entry.mtime_ns)])
                for i, r in enumerate(batch)
            ],
            links=[(r.entry.path, r.entry.size, r.entry.mtime_ns, r.sha256) for r in links],
            failures=[(f.entry.path, f.entry.size, f.entry.mtime_ns, f.reason, f.message) for f in failures],
        )
        if batch:
            if self.write_features and self.library.features is not None:
                vit_np = vit.float().cpu().numpy()
                for i, image_id in enumerate(new_ids):
                    self.library.features.put(image_id, vit_np[i])
            for r, image_id in zip(batch, new_ids):
                self.library.thumbnails.put_bytes(image_id, r.thumbnail)
            self.library.add_vectors(new_ids, itc)
        self.library.forget_images(orphans)
        summary.indexed += len(batch)
        summary.linked += len(links)
        for r in batch:
            summary.note("indexed", r.entry.path)
        for r in links:
            summary.note("linked", r.entry.path)

    def _caption(self, batch: list[_Ready], summary: Summary) -> None:
        """Caption the batch into each image's metadata; failures keep the image, with a reason."""
        import torch

        ready = [r.caption_pixels for r in batch if r.caption_pixels is not None]
        captions = iter(self.captioner.caption_pixels(torch.stack(ready)) if ready else [])
        for r in batch:
            c = next(captions) if r.caption_pixels is not None else Caption(None, r.caption_error)
            r.decoded.meta.caption, r.decoded.meta.caption_error = c.text, c.error
            r.decoded.meta.caption_model = self.captioner.name if c.text is not None else None
            if c.text is not None:
                summary.captioned += 1
            else:
                summary.caption_failed += 1
                summary.note("no caption", f"{r.entry.path}: {c.error}")
                self.on_caption_error(r.entry.path, c.error)

