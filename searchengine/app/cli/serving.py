"""`searchengine serve`, and the watcher it runs with --watch."""

from __future__ import annotations

import argparse
import logging
import os

from searchengine.app import wiring
from searchengine.app.cli.options import lock_new_index
from searchengine.config.settings import Settings, settings_from_args
from searchengine.errors import IndexNotFoundError, SearchEngineError
from searchengine.util.nearest import missing_folder


def _watch_in_server(settings: Settings, args: argparse.Namespace, captioner):
    """The `serve --watch` hook: a watcher in the server's process, with its loaded model."""

    def on_ready(service):
        from searchengine.indexing.pipeline import Indexer
        from searchengine.indexing.watch import Watcher

        # The server's own Library: one vector index in memory, which the watcher's writes
        # update in place for the queries (no second copy, no re-reading from the store).
        library = service.library
        library.require_writable("--watch writes to it")
        lock_new_index(args)
        library.record_captioner(captioner is not None, captioner.name if captioner else None)
        service.answerer.share(captioner)  # a BLIP-2 captioner answers questions too, from the same weights
        # service.model is the locked model: indexing and queries take turns on it.
        indexer = Indexer(service.model, library, settings, captioner=captioner)
        watcher = Watcher(indexer, args.watch, poll=args.poll, debounce_s=args.debounce)
        log = logging.getLogger("searchengine.indexing.watch")
        log.info("catching up with %s, then watching", ", ".join(map(str, watcher.roots)))
        summary = watcher.start()
        log.info("%s", watcher.caught_up_line(summary))
        return _ServerWatch(watcher)

    return on_ready


class _ServerWatch:
    """The watcher of `serve --watch`, as the API's companion: stopped with it, and asked by
    /healthz whether it still works."""

    def __init__(self, watcher) -> None:
        self.watcher = watcher

    def stop(self) -> None:
        # The library is the server's, closed by it once this returns: so wait for the thread.
        ended = self.watcher.stop()
        logging.getLogger("searchengine.indexing.watch").info("%s", self.watcher.stopped_line(ended))

    def health(self) -> str | None:
        return self.watcher.health()


def cmd_serve(args: argparse.Namespace, out, err) -> int:
    import functools
    import ipaddress

    import uvicorn

    from searchengine.app.api import create_app
    from searchengine.library import Library
    from searchengine.util.locks import serving_lock

    settings = settings_from_args(args)
    try:
        loopback = ipaddress.ip_address(settings.host).is_loopback
    except ValueError:
        loopback = settings.host == "localhost"
    if not loopback and settings.api_key is None:
        print(
            f"searchengine: warning: serving on {settings.host} without an API key: anyone who can reach it sees "
            "your photos; set SEARCHENGINE_API_KEY",
            file=err,
        )
    for folder in args.watch:
        if not os.path.isdir(os.path.expanduser(folder)):
            raise SearchEngineError(missing_folder(folder))
    if args.watch:
        Library.check_writable(settings)  # a read-only index can be served, not watched
    recorded = Library.recorded(settings)
    if recorded is None and not args.watch:  # only index and watch make a new index
        raise IndexNotFoundError(
            f"no index in {settings.data_dir}: run `searchengine index FOLDER` first, or `searchengine serve --watch FOLDER`, "
            "or point --data-dir at one"
        )
    # Both models are checked to be at hand, and the captioner loaded, before the server
    # starts: one that cannot load stops `serve --watch` with one line, rather than leaving a
    # server that indexes without captions.
    choice = wiring.choose(settings, recorded, captions=bool(args.watch))
    logging.getLogger("searchengine").setLevel(logging.INFO)
    on_ready = _watch_in_server(settings, args, wiring.load_captioner(settings, choice.caption_model)) if args.watch else None
    loader = functools.partial(wiring.open_for_serving, create=bool(args.watch), model=choice.model)
    app = create_app(settings, loader=loader, on_ready=on_ready)
    held = serving_lock(settings.data_dir)  # `restore` waits for this server to stop (held until exit)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, access_log=False, log_level="info")
    finally:
        if held is not None:
            os.close(held)
    return 0
