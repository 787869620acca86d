"""Keep the index in step with photo folders as files come, change, move and go.

The protocol, which is what makes `kill -9` at any moment safe:
1. Events (watchdog: inotify, or polling) only mark paths as dirty. Nothing is written from an
   event handler.
2. A dirty path is handled once it has been quiet for `debounce_s` *and* two looks
   `debounce_s` apart agree (same size and mtime, or missing both times). A file still being
   copied keeps changing, so it waits, and it is never read half-written.
3. Settled paths go through `Indexer.update`: new and changed files first, then removed
   paths. A moved file therefore links to its content, still in the store under the old path,
   and keeps its id, vectors and caption; a moved folder is the same, file by file. Each model
   batch is one store transaction; the FAISS file is saved atomically after each update (see
   `searchengine.library` for the order of writes).
4. On start, a full incremental scan reconciles the folders with the store (what changed while
   nothing watched), and opening the library reconciles FAISS with the store (what a crash
   left). A crash loses at most the batch in flight, which was never committed; its files
   are still on disk and the start-up scan picks them up. Nothing is indexed twice (content
   hashes and unique paths), and no vectors of deleted files survive (reconcile drops ids the
   store no longer has).

Memory stays flat: a path leaves the dirty set once handled, and no per-file state is kept
beyond it.

Symlinked folders: the start-up scan follows them (see `searchengine.indexing.scan`). Native events do not:
inotify watches real folders only, and watchdog is asked not to follow links, because a link
that loops would make it add watches without end. So a folder link that is made or removed is
seen (its files are marked), but changes *inside* a linked folder that lies outside the root
are not, until the next start. Polling follows such links, except those that loop back or lead
into the root (the scan lists those folders under their real path), so `--poll` sees inside
them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from stat import S_ISLNK
from typing import Callable, Sequence

from searchengine.indexing.pipeline import Indexer, Stopped, Summary
from searchengine.indexing.scan import BAD_NAME, FileEntry, printable, scan_folder, storable
from searchengine.errors import SearchEngineError
from searchengine.store.connection import is_unreachable
from searchengine.media.links import OUTSIDE_MESSAGE, LinkPolicy, folder_link_allowed
from searchengine.media.imageio import image_extensions

log = logging.getLogger(__name__)

ROOT_CHECK_S = 2.0  # how often the roots are checked for having gone and come back
RETRY_BASE_S = 2.0  # a failed update is retried after 2, 4, 8 ... seconds
RETRY_MAX_S = 300.0


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a folder, None when it is not there: a remount or a folder made again
    has a new one, and its old inotify watches see nothing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if os.path.isdir(path) else None

# File systems where inotify sees nothing of changes made by other machines.
NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "davfs",
              "fuse.sshfs", "fuse.rclone", "fuse.s3fs", "fuse.gcsfuse"}


def filesystem_type(path: Path) -> str:
    """The type of the file system holding `path`, from /proc/mounts ('' where unknown)."""
    best, kind = "", ""
    try:
        with open("/proc/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    mount = parts[1].replace("\\040", " ")
                    if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                        best, kind = mount, parts[2]
    except OSError:
        pass
    return kind


class Watcher:
    def __init__(
        self,
        indexer: Indexer,
        roots: Sequence[str | os.PathLike],
        *,
        poll: bool | None = None,  # None: polling where native events cannot work
        debounce_s: float = 1.0,
        poll_interval_s: float = 1.0,
        on_update: Callable[[Summary], None] | None = None,
    ) -> None:
        self.indexer = indexer
        self.library = indexer.library
        self.roots = [Path(r).expanduser().resolve() for r in roots]
        self.poll = poll
        self.debounce_s = debounce_s
        self.poll_interval_s = poll_interval_s
        self.on_update = on_update or (lambda summary: None)
        self.extensions = image_extensions()
        self.data_dir = str(Path(indexer.settings.data_dir).resolve())
        self._dirty: dict[str, float] = {}  # path -> last event time
        self._looked: dict[str, tuple[int, int] | None] = {}  # path -> (size, mtime_ns) last looked; None: missing
        self._missing_since: dict[str, float] = {}
        self._updating = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._observers: dict[str, object] = {}  # root -> its watchdog observer
        self._identity: dict[str, tuple[int, int] | None] = {}  # root -> (st_dev, st_ino) when observed
        self._thread: threading.Thread | None = None
        self.modes: dict[str, str] = {}
        # Paths whose update failed (disk full, a store error): retried with backoff, never
        # forgotten. path -> failed attempts so far.
        self._attempts: dict[str, int] = {}
        self.failure: str | None = None  # the last update's error, while paths wait for a retry
        self._next_root_check = 0.0
        self._said_absent: dict[str, str | None] = {}  # root -> why it is absent, as last logged
        self.since_start = Summary()  # what the events did after the catch-up (`add_up`)
        self._store_failure: str | None = None  # why the last round could not use the store (logged once)
        self.left = 0  # files of the update `stop` ended, left for the next start

    # -- life ------------------------------------------------------------------------------

    def start(self) -> Summary:
        """Start watching the folders, catch up with them, then handle events in a thread.

        Watching starts first: a file that arrives while the catch-up scan runs is an event
        queued until the scan is done, then handled against what the scan indexed (a path it
        indexed already is unchanged and left alone). Watching after the scan missed every file
        that came in between (100 of 300 arriving during start-up, from outside).
        """
        try:
            for root in self.roots:
                if root.is_dir():  # the scan below refuses one that is not, with its own message
                    self._observe(root)
            summary = self.indexer.run(self.roots)
        except BaseException:
            self.stop()
            raise
        self.on_update(summary)
        self._thread = threading.Thread(target=self._loop, name="watcher", daemon=True)
        self._thread.start()
        return summary

    def stop(self, timeout_s: float = 60.0) -> bool:
        """Stop watching; an update in progress ends before its next batch is committed (what
        it had not committed is found again at the next start's catch-up). True when the
        watcher's thread has ended within `timeout_s`."""
        self._stop.set()
        self.indexer.stop()
        for observer in self._observers.values():
            observer.stop()
        for observer in self._observers.values():
            observer.join(timeout=min(10.0, timeout_s))
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            return not self._thread.is_alive()
        return True

    def caught_up_line(self, summary: Summary) -> str:
        """What `watch` prints (and `serve --watch` logs) once the catch-up scan is done."""
        return (f"caught up: {summary.indexed} indexed, {summary.linked} linked, {summary.moved} moved, "
                f"{summary.unchanged} unchanged, {summary.removed} removed, {summary.skipped} skipped; watching "
                + ", ".join(f"{root} ({mode})" for root, mode in self.modes.items()))

    def stopped_line(self, ended: bool) -> str:
        """What the watcher did after its catch-up, once stopped; `ended`: `stop` saw its
        thread end (else an update was still on its way, its files the next start's)."""
        since = self.since_start
        line = (f"stopped watching: since catching up {since.indexed} indexed, {since.linked} linked, {since.moved} moved, "
                f"{since.removed} removed, {since.skipped} skipped")
        if not ended:
            line += "; an update was still on its way: its files are indexed at the next start"
        elif self.left:
            line += f"; {self.left} changed file{'s' if self.left != 1 else ''} left for the next start"
        return line

    def health(self) -> str | None:
        """None while the watcher works; else what is wrong (for /healthz)."""
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            return "the watcher has stopped: new photos are not indexed; see the log, then restart"
        if self._store_failure is not None:
            return f"{self.pending()} changes wait: {self._store_failure}"
        if self.failure is not None:
            return f"indexing {len(self._attempts)} changed files failed ({self.failure}); retrying"
        return None

    def _observe(self, root: Path) -> None:
        from watchdog.observers import Observer

        poll = self.poll
        if poll is None:
            fs = filesystem_type(root)
            poll = fs in NETWORK_FS
            if poll:
                log.info("%s is on %s: watching it by polling", root, fs)
        handler = _Handler(self)
        observer = self._polling_observer(root) if poll else Observer()
        observer.schedule(handler, str(root), recursive=True)
        try:
            observer.start()
        except OSError as e:  # e.g. the inotify watch limit: poll rather than see nothing
            if poll:
                raise
            log.warning("native events failed for %s (%s); watching it by polling", root, e)
            observer = self._polling_observer(root)
            observer.schedule(handler, str(root), recursive=True)
            observer.start()
            poll = True
        self.modes[str(root)] = "polling" if poll else "native"
        self._observers[str(root)] = observer
        self._identity[str(root)] = _identity(root)

    def check_roots(self) -> list[Path]:
        """Re-attach to roots that went and came back (unmounted and mounted again, removed and
        made again) or whose observer died: their inotify watches are gone, so without this the
        watcher goes deaf. Returns the roots re-attached; each is then scanned again."""
        back = []
        for root in self.roots:
            key = str(root)
            now = _identity(root)
            observer = self._observers.get(key)
            was = self._identity.get(key)
            if now is None:
                if was is not None:
                    log.warning("folder %s is gone (unmounted or removed?); watching for it to come back", root)
                    self._identity[key] = None
                continue
            if now == was and observer is not None and observer.is_alive():
                continue
            log.warning("folder %s is %s: watching it again and rescanning", root, "back" if was is None else "a new folder now")
            if observer is not None:
                observer.stop()
                observer.join(timeout=10)
                self._observers.pop(key, None)
            self._observe(root)
            back.append(root)
        return back

    def _polling_observer(self, root: Path):
        from watchdog.observers.polling import PollingObserverVFS

        def stat(path: str) -> os.stat_result:
            # A folder link that loops back or leads into the root reads as a link, not a
            # folder, so the snapshot does not walk it: a loop would make it walk without end,
            # and the scan lists a folder inside the root under its real path only.
            st = os.lstat(path)
            if S_ISLNK(st.st_mode) and not self._followed(path, root, self.library.link_policy):
                return st
            return os.stat(path) if S_ISLNK(st.st_mode) else st

        return PollingObserverVFS(stat, os.scandir, polling_interval=self.poll_interval_s)

    @staticmethod
    def _followed(link: str, root: Path, policy: LinkPolicy) -> bool:
        """Whether the scan walks this folder link: not into the root, not back up to it, and
        not outside the library where the link policy forbids it."""
        target = os.path.realpath(link)
        root_s = str(root)
        inside = target == root_s or target.startswith(root_s + os.sep)
        loops = (root_s + os.sep).startswith(target.rstrip(os.sep) + os.sep)
        return not inside and not loops and folder_link_allowed(link, [root_s], policy)

    # -- events ----------------------------------------------------------------------------

    def mark(self, path: str) -> None:
        if self._wanted(path):
            with self._lock:
                self._dirty[path] = time.monotonic()

    def mark_folder(self, folder: str) -> None:
        """A folder came, went or moved: every file the store or the disk has below it."""
        paths = set(self.library.catalog.files_under(folder))
        if os.path.isdir(folder):
            roots = tuple(map(Path, self.library.catalog.roots()))
            found = scan_folder(Path(folder), exclude=(Path(self.data_dir),), links=self.library.link_policy, roots=roots)
            paths |= {e.path for e in found}
        for path in paths:
            self.mark(path)

    def mark_link(self, path: str) -> None:
        """A name that is not an image file came or went: maybe a folder link. Its files are
        marked as the scan would list them (none for a link the scan does not follow)."""
        if os.path.isdir(path):
            root = next((r for r in self.roots if path.startswith(str(r) + os.sep)), None)
            if root is not None and os.path.islink(path) and self._followed(path, root, self.library.link_policy):
                self.mark_folder(path)
        elif self.library.catalog.files_under(path):
            self.mark_folder(path)

    def _wanted(self, path: str) -> bool:
        """What the scan would list: image files, not hidden, not in a hidden folder *below* a
        root (the root itself may sit in one, such as ~/.photos), not in the data dir."""
        name = os.path.basename(path)
        if name.startswith(".") or os.path.splitext(name)[1].lower() not in self.extensions:
            return False
        if not storable(path):
            log.warning("skipping %s: %s", printable(path), BAD_NAME)
            return False
        if path.startswith(self.data_dir + os.sep):
            return False
        for root in self.roots:
            root_s = str(root)
            if path.startswith(root_s + os.sep):
                below = path[len(root_s) + 1 :].split(os.sep)[:-1]
                return not any(part.startswith(".") for part in below)
        return False

    # -- handling settled paths --------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(min(0.25, self.debounce_s / 2)):
            try:
                if time.monotonic() >= self._next_root_check:
                    self._next_root_check = time.monotonic() + ROOT_CHECK_S
                    for root in self.check_roots():
                        self._rescan(root)
                self.step()
                self._store_failure = None
            except Exception as e:  # one bad round must not end the watch
                if isinstance(e, SearchEngineError) or is_unreachable(e):  # the store cannot be used now: retried
                    if self._store_failure != str(e):  # said once, not four times a second
                        log.error("cannot look at the changes now, %d waiting: %s", self.pending(), e)
                    self._store_failure = str(e)
                else:
                    log.exception("watcher step failed")

    def _rescan(self, root: Path) -> None:
        """What changed under a root while nothing watched it: every path the store or the disk
        has there goes through the usual settle-and-update steps."""
        self.mark_folder(str(root))

    def pending(self) -> int:
        """Paths not yet handled, counting those in an update that is still running."""
        with self._lock:
            return len(self._dirty) + self._updating

    def step(self) -> Summary | None:
        """Handle the paths that have settled; return what was done, if anything."""
        now = time.monotonic()
        with self._lock:
            settled = [p for p, t in self._dirty.items() if now - t >= self.debounce_s]
        changed: list[FileEntry] = []
        gone: list[str] = []
        for path in settled:
            try:
                st = os.stat(path)
                look: tuple[int, int] | None = (st.st_size, st.st_mtime_ns) if os.path.isfile(path) else None
            except OSError:
                look = None
            if look is not None and os.path.islink(path) and not self.library.inside(path):
                # A file link that leads outside the library reads as no file: not indexed,
                # and dropped if it was (re-pointed after indexing).
                log.info("not following %s: %s", path, OUTSIDE_MESSAGE)
                look = None
            if self._looked.get(path, "unseen") != look:  # first look, or still changing
                with self._lock:
                    self._looked[path] = look
                    self._dirty[path] = now
                    if look is None:
                        self._missing_since.setdefault(path, now)
                continue
            if look is None:
                gone.append(path)
                continue
            known = self.library.catalog.file_state(path)  # before the path leaves the list: a store error keeps it
            self._done(path)
            if known is None or (known.size, known.mtime_ns) != look:
                changed.append(FileEntry(path, *look))
            else:  # as indexed already: a retry of a file the failed update had committed
                self._no_retry(path)
        # A move is a removal and an addition. The addition must go first (it links to the
        # content the old path still holds), so removals wait while any file is between its
        # two looks; never longer than 10 debounce periods, so churn cannot starve them.
        with self._lock:
            adding = any(look is not None for look in self._looked.values())
        removed = []
        # Below a root that is absent (not there, or an unmounted disk's empty mount point: see
        # Indexer.absent), a missing file is not a deleted one: it stays indexed, and the
        # root's rescan when it comes back settles it.
        absent = [str(r) + os.sep for r in self.roots if gone and self._absent(r)]
        for path in gone:
            if any(path.startswith(a) for a in absent):
                self._done(path)
                continue
            if not adding or now - self._missing_since.get(path, now) >= 10 * self.debounce_s:
                self._done(path)
                if self.library.catalog.file_state(path) is not None:
                    removed.append(path)
                else:
                    self._no_retry(path)
        if not changed and not removed:
            return None
        with self._lock:
            self._updating = len(changed) + len(removed)
        try:
            summary = self.indexer.update(changed, removed, Summary(record=True))
        except Stopped:  # `stop`: the next start's catch-up scan finds these files again
            self.left = len(changed) + len(removed)
            return None
        except Exception as e:  # noqa: BLE001 - kept and retried, never forgotten
            self._retry([c.path for c in changed] + removed, e)
            return None
        finally:
            with self._lock:
                self._updating = 0
        with self._lock:
            for path in [c.path for c in changed] + removed:
                self._attempts.pop(path, None)
            if not self._attempts:
                self.failure = None
        # Each file once, by name; the only place a watcher reports them.
        for what, detail in summary.changes:
            if what in ("skipped", "no caption"):
                log.warning("%s %s", "skipping" if what == "skipped" else "no caption for", detail)
            else:
                log.info("%s %s", what, detail)
        log.info(
            "%d indexed, %d linked, %d moved, %d removed, %d skipped",
            summary.indexed, summary.linked, summary.moved, summary.removed, summary.skipped,
        )
        self.library.maybe_backup()  # at most once per backup_interval_s
        add_up(self.since_start, summary)
        self.on_update(summary)
        return summary

    def _retry(self, paths: list[str], error: Exception) -> None:
        """Put paths whose update failed back, due again after a backoff (2, 4, 8 ... 300 s)."""
        now = time.monotonic()
        with self._lock:
            attempts = max((self._attempts.get(p, 0) for p in paths), default=0) + 1
            delay = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (attempts - 1))
            for path in paths:
                self._attempts[path] = attempts
                self._dirty[path] = now + delay - self.debounce_s  # settles when the delay is up
            self.failure = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        log.warning("could not index %d changed files (%s); retrying in %.0f s", len(paths), self.failure, delay)

    def _no_retry(self, path: str) -> None:
        """A path that needs nothing (any more): off the retry list, and the failure cleared
        once the list is empty. A failed update may have committed some of its files before it
        failed (a full disk mid-run): their retry finds them indexed, and /healthz stayed 503
        for good while they stayed on the list."""
        with self._lock:
            if self._attempts.pop(path, None) is not None and not self._attempts:
                self.failure = None
                log.info("the files that failed to index are indexed now")

    def _absent(self, root: Path) -> bool:
        why = "gone" if _identity(root) is None else self.indexer.absent(root, 1)
        if why is not None and self._said_absent.get(str(root)) != why:
            log.warning("%s; its indexed files stay in the index until it is back", why if why != "gone" else f"folder {root} is gone")
        self._said_absent[str(root)] = why
        return why is not None

    def _done(self, path: str) -> None:
        with self._lock:
            self._dirty.pop(path, None)
            self._looked.pop(path, None)
            self._missing_since.pop(path, None)


def add_up(total: Summary, more: Summary) -> None:
    """Add one update's counts to a running total (the watcher's since its start)."""
    for name in ("indexed", "linked", "moved", "removed", "unchanged"):
        setattr(total, name, getattr(total, name) + getattr(more, name))
    total.failed.update(more.failed)


class _Handler:
    """watchdog's event handler interface, forwarding to the watcher's marks."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher

    def dispatch(self, event) -> None:
        w = self.watcher
        kind = event.event_type
        paths = [os.fsdecode(event.src_path)]
        if kind == "moved":
            paths.append(os.fsdecode(event.dest_path))
        if kind in ("opened", "closed_no_write"):
            return
        for path in paths:
            if event.is_directory:
                if kind in ("created", "deleted", "moved"):
                    w.mark_folder(path)
            elif kind in ("created", "deleted", "moved") and os.path.splitext(path)[1].lower() not in w.extensions:
                w.mark_link(path)  # inotify reports a folder link as a file
            else:
                w.mark(path)
