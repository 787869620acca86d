"""The `searchengine` command: index, search, caption, stats, watch, serve, make-tiny-model.

This module is the composition root: it builds the settings, the model, the library and the
indexer or searcher, and passes them in. It is the only module of `searchengine` that reaches
into `indexer` (lazily, in the `index` command); the core never does. Errors the core raises
become one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
from typing import Sequence

from pydantic import ValidationError

from searchengine.app import tuning_cli as cli_models
from searchengine.app.cli.indexing import cmd_caption, cmd_index, cmd_reindex, cmd_watch
from searchengine.app.cli.maintenance import (
    cmd_backup,
    cmd_check,
    cmd_make_tiny_model,
    cmd_restore,
    cmd_stats,
)
from searchengine.app.cli.options import EXIT_ERROR, EXIT_USAGE
from searchengine.app.cli.parser import build_parser, dash_words_as_query
from searchengine.app.cli.searching import cmd_ask, cmd_duplicates, cmd_explain, cmd_search
from searchengine.app.cli.serving import cmd_serve
from searchengine.config.settings import settings_from_args
from searchengine.errors import SearchEngineError
from searchengine.util import locks


def _quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Torch's OpenMP threads spin while they wait for work by default, taking the cores the
    # decode threads (and anything else on the machine) need: 5-6x slower indexing measured
    # under load (benchmarks/threads.py). Set before torch loads; an explicit value is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not verbose:  # the hub client logs every retry of an unreachable host as a warning
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def _disk_full(e: BaseException) -> bool:
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "database or disk is full" in str(e)


# Commands that write to the index: one at a time per data dir (see `writer_lock`).
WRITERS = set(locks.WRITERS)


def as_the_writer(args: argparse.Namespace, out, err) -> int:
    """The command, holding the data dir's writer lock. A data dir that does not exist yet is
    not made here (a command that fails first must leave nothing behind): the command takes
    the lock itself, through `lock_new_index`, once it has made the index."""
    from searchengine.library import Library
    from searchengine.util.locks import writer_lock

    settings = settings_from_args(args)
    if args.command != "restore":
        Library.check_writable(settings)  # a read-only index: that message, not a lock error
    with contextlib.ExitStack() as stack:
        command = " ".join(sys.argv[1:3]) or args.command
        args.lock = lambda: stack.enter_context(writer_lock(settings.data_dir, command))
        if settings.data_dir.is_dir():
            args.lock()
            args.lock = None
        return COMMANDS[args.command](args, out, err)


COMMANDS = {
    "index": cmd_index,
    "search": cmd_search,
    "caption": cmd_caption,
    "stats": cmd_stats,
    "watch": cmd_watch,
    "serve": cmd_serve,
    "ask": cmd_ask,
    "explain": cmd_explain,
    "duplicates": cmd_duplicates,
    "make-tiny-model": cmd_make_tiny_model,
    "reindex": cmd_reindex,
    "check": cmd_check,
    "backup": cmd_backup,
    "restore": cmd_restore,
    **cli_models.COMMANDS,
}


def _store_location(args: argparse.Namespace) -> str:
    """ " (where)", the store as messages name it (no password), or "" if the settings cannot say."""
    try:
        return f" ({settings_from_args(args).store_location})"
    except Exception:  # noqa: BLE001 - only for a message
        return ""


def main(argv: Sequence[str] | None = None, out=None, err=None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    args = parser.parse_args(dash_words_as_query(parser, list(sys.argv[1:] if argv is None else argv)))
    try:
        _quiet_libraries(args.__dict__.get("verbose", False))
        if args.command in WRITERS or (args.command == "serve" and args.watch):
            return as_the_writer(args, out, err)
        return COMMANDS[args.command](args, out, err)
    except SearchEngineError as e:
        print(f"searchengine: error: {e}", file=err)
        return EXIT_ERROR
    except ValidationError as e:  # a setting out of range, from a flag or the environment
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        print(f"searchengine: error: invalid setting: {problems}", file=err)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("searchengine: interrupted", file=err)
        return 130

    except BrokenPipeError:  # `searchengine search ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # pydantic validation of settings, and anything unforeseen: one line
        from searchengine.store.connection import damage, is_unreachable

        if is_unreachable(e):  # `index` died with a raw "OperationalError: consuming input failed"
            where = _store_location(args)
            print(f"searchengine: error: the index store{where} cannot be reached ({damage(e)}); what was committed "
                  "before is kept: run the command again once it is back", file=err)
            return EXIT_ERROR
        if _disk_full(e):  # from the OS, from SQLite, or from FAISS (see vector_index.write_atomic)
            print("searchengine: error: the disk holding the index is full: free some space and run it again; "
                  "what was indexed before is kept", file=err)
            return EXIT_ERROR
        if args.__dict__.get("verbose"):
            raise
        print(f"searchengine: error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''} (run with -v for details)", file=err)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
