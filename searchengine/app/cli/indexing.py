"""The commands that fill the index: index, caption, watch, reindex."""

from __future__ import annotations

import argparse
import logging
import os
import time

from searchengine.app import wiring
from searchengine.app.cli.options import lock_new_index, secs
from searchengine.config.settings import Settings, settings_from_args
from searchengine.errors import SearchEngineError
from searchengine.util.nearest import missing_folder


def bar_report(bar, err, *, skipped: str = "skipping"):
    """A run's `Report` on a tqdm bar: counts move the bar, messages print above it."""
    from searchengine.indexing.report import Report

    return Report(
        total=lambda n: bar.reset(total=n),
        done=bar.update,
        skipped=lambda what, why: bar.write(f"{skipped} {what}: {why}", file=err),
        caption_failed=lambda path, why: bar.write(f"no caption for {path}: {why}", file=err),
    )


def _folders(args: argparse.Namespace, settings: Settings, recorded, err) -> list[str]:
    """The folders named, or else every folder the index has (those not there now are
    skipped with a word: an unmounted disk must not empty the index)."""
    for folder in args.folders:  # fail before loading a 5 GB model
        path = os.path.expanduser(folder)
        if not os.path.isdir(path):
            raise SearchEngineError(f"{folder!r} is not a folder" if os.path.exists(path) else missing_folder(folder))
    if args.folders:
        return list(args.folders)
    roots = list(recorded.roots) if recorded is not None else []
    if not roots:
        have = "there is no index" if recorded is None else "the index has no folders"
        raise SearchEngineError(f"name a folder: `searchengine {args.command} ~/Pictures` ({have} in {settings.data_dir} yet)")
    present = [r for r in roots if os.path.isdir(r)]
    for r in roots:
        if r not in present:
            print(f"skipping folder {r}: it is not there now (unmounted?); its images stay in the index", file=err)
    if not present:
        raise SearchEngineError("none of the index's folders is there now: " + ", ".join(roots))
    return present


def cmd_index(args: argparse.Namespace, out, err) -> int:
    from tqdm import tqdm

    from searchengine.indexing.pipeline import Indexer
    from searchengine.library import Library

    started = time.perf_counter()
    settings = settings_from_args(args)
    runner = None
    if args.runner == "ray":
        from searchengine.indexing.ray_runner import Loaders, RayRunner, check_installed

        check_installed()  # before any model loads
        runner = RayRunner(settings, Loaders(wiring.load_model, wiring.load_captioner), args.ray_address)
    recorded = Library.recorded(settings)
    folders = _folders(args, settings, recorded, err)
    parts = wiring.open_for_indexing(settings, recorded)
    library, model, captioner, load_s = parts.library, parts.model, parts.captioner, parts.load_s
    lock_new_index(args)
    bar = tqdm(total=0, unit="file", file=err, disable=None, dynamic_ncols=True)

    try:
        indexer = Indexer(
            model, library, settings, report=bar_report(bar, err), captioner=captioner, runner=runner, prune=args.prune,
        )
        library.record_captioner(captioner is not None, captioner.name if captioner else None)
        summary = indexer.run(folders)
        if summary.indexed or summary.linked or summary.moved or summary.removed or summary.skipped:
            library.backup()  # the store is the one thing not rebuilt from the others
    finally:
        bar.close()
        library.close()
    line = f"{summary.indexed} indexed, {summary.linked} duplicates linked, "
    line += f"{summary.moved} moved, " if summary.moved else ""
    line += f"{summary.unchanged} unchanged, {summary.removed} removed, {summary.skipped} skipped"
    if summary.kept_absent:
        line += f", {summary.kept_absent} kept (their folder is absent: --prune drops them)"
    if summary.failed:
        line += " (" + ", ".join(f"{reason}: {n}" for reason, n in sorted(summary.failed.items())) + ")"
    if summary.links_skipped:
        line += f", {summary.links_skipped} folder link{'s' if summary.links_skipped > 1 else ''} not followed (loops or already listed)"
    if summary.links_outside:
        line += f", {summary.links_outside} link{'s' if summary.links_outside > 1 else ''} leading outside the folders not followed (--links all follows them)"
    if captioner is not None:
        line += f"; {summary.captioned} captioned" + (f", {summary.caption_failed} without caption" if summary.caption_failed else "")
    # The rate counts the images embedded, over the time the run took once the models were in.
    rate = f" ({summary.indexed / summary.seconds:.2f} images/s)" if summary.indexed and summary.seconds > 0 else ""
    total = time.perf_counter() - started
    print(f"{line}; {secs(total)} s: loading models {secs(load_s)} s, indexing {secs(summary.seconds)} s{rate}", file=out)
    if summary.time and "cluster" in summary.time:  # --runner ray: the stages ran on the cluster
        t = summary.time
        print(f"time: waiting for the cluster (read, decode, models) {t['cluster']:.1f} s, write {t['write']:.1f} s", file=out)
    elif summary.time:
        t = summary.time
        print(
            f"time: read {t['read']:.1f} s and decode {t['decode']:.1f} s (over {settings.decode_threads} threads, "
            f"alongside), model {t['model']:.1f} s, captions {t['captions']:.1f} s, write {t['write']:.1f} s (alongside the models)",
            file=out,
        )
    return 0


def cmd_caption(args: argparse.Namespace, out, err) -> int:
    from tqdm import tqdm

    from searchengine.indexing.recaption import Recaptioner

    settings = settings_from_args(args)
    if settings.captions is False:
        raise SearchEngineError("`caption` with --no-captions has nothing to do")
    # Before the model: a missing or read-only index is reported at once.
    library, captioner = wiring.open_for_captioning(settings)
    try:
        bar = tqdm(total=0, unit="img", file=err, disable=None, dynamic_ncols=True)
        try:
            summary = Recaptioner(captioner, library, settings, report=bar_report(bar, err)).run(redo=args.redo)
        finally:
            bar.close()
        library.record_captioner(True, captioner.name)
    finally:
        library.close()
    rate = summary.captioned / summary.seconds if summary.seconds > 0 else 0.0
    print(
        f"{summary.captioned} captioned with {captioner.name}, {summary.failed} failed; "
        f"{summary.seconds:.1f} s ({rate:.2f} images/s)",
        file=out,
    )
    return 0


def cmd_watch(args: argparse.Namespace, out, err) -> int:
    import signal
    import threading

    from searchengine.indexing.pipeline import Indexer
    from searchengine.indexing.watch import Watcher
    from searchengine.library import Library

    settings = settings_from_args(args)
    recorded = Library.recorded(settings)
    folders = _folders(args, settings, recorded, err)
    logging.getLogger("searchengine.indexing").setLevel(logging.INFO)
    parts = wiring.open_for_indexing(settings, recorded)
    library, model, captioner = parts.library, parts.model, parts.captioner
    lock_new_index(args)
    library.record_captioner(captioner is not None, captioner.name if captioner else None)
    # No on_skip here: the watcher logs every file it handles, skipped ones too, once.
    indexer = Indexer(model, library, settings, captioner=captioner)
    watcher = Watcher(indexer, folders, poll=args.poll, debounce_s=args.debounce)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    summary = watcher.start()
    print(watcher.caught_up_line(summary), file=out, flush=True)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        # Within 2 s: an update in progress ends before its next commit, and a model batch on
        # its way is not waited for (it took 12 s); the next start's catch-up finds its files.
        ended = watcher.stop(timeout_s=1.5)
        if ended:
            library.close()
        print(watcher.stopped_line(ended), file=out, flush=True)
    return 0


def cmd_reindex(args: argparse.Namespace, out, err) -> int:
    from tqdm import tqdm

    from searchengine.indexing.reindex import Reindexer
    from searchengine.library import Library

    settings = settings_from_args(args)
    if not settings.model:
        raise SearchEngineError("name the model to re-index with: `searchengine reindex --model DIR_OR_HUB_ID`")
    library = Library.open(settings, writable=True, vectors=False)  # the old vectors are not needed here
    try:
        model = wiring.load_model(settings, settings.model)
        bar = tqdm(total=0, unit="img", file=err, disable=None, dynamic_ncols=True)
        try:
            summary = Reindexer(model, library, settings, report=bar_report(bar, err, skipped="leaving out")).run()
        except KeyboardInterrupt:
            bar.close()
            print("interrupted: the index still uses its old model; run the same command to go on where it stopped", file=err)
            raise
        finally:
            bar.close()
        library.backup()
    finally:
        library.close()
    rate = f" ({summary.embedded / summary.seconds:.2f} images/s)" if summary.embedded and summary.seconds > 0 else ""
    resumed = f" (after {summary.resumed_from} done before)" if summary.resumed_from else ""
    gone = f"; {summary.gone} image{'s' if summary.gone != 1 else ''} with no file left to read left the index" if summary.gone else ""
    print(f"{summary.embedded} images re-embedded{resumed} in {summary.seconds:.1f} s{rate}{gone}; "
          f"the index now uses {model.name} (fingerprint {model.fingerprint})", file=out)
    return 0
