"""The `searchengine` command's entry point. It answers what needs nothing imported before
the CLI's own imports (SQLAlchemy, numpy, pydantic: 1.2 s on an idle 2-core machine, 5 s on
a busy one): `--version`, and a second indexer on a data dir whose writer lock is held. Then
it hands over to `searchengine.app.cli`."""

from __future__ import annotations

import os
import sys
import threading
from typing import Sequence



def data_dir_named(args: Sequence[str]) -> str | None:
    """The data dir these arguments choose, as `Settings` would resolve it (--data-dir, then
    SEARCHENGINE_DATA_DIR in any case, then the XDG default), or None where only the full
    parser can tell (an abbreviated option, help asked for)."""
    named = None
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg in ("-h", "--help"):
            return None
        if arg == "--data-dir":
            if i + 1 >= len(args):
                return None
            named = args[i + 1]
        elif arg.startswith("--data-dir="):
            named = arg.split("=", 1)[1]
        elif len(opt := arg.split("=", 1)[0]) > 2 and "--data-dir".startswith(opt):
            return None  # an abbreviation argparse may take for --data-dir: the parser's to say
    if named is not None:
        return named
    if "SEARCHENGINE_DATA_DIR" in os.environ:
        return os.environ["SEARCHENGINE_DATA_DIR"]
    for key, value in os.environ.items():  # pydantic-settings reads the names in any case
        if key.upper() == "SEARCHENGINE_DATA_DIR":
            return value
    from searchengine.config.datadir import default_data_dir

    return str(default_data_dir())


def takes_the_writer_lock(args: Sequence[str]) -> bool:
    from searchengine.util.locks import WRITERS

    return bool(args) and (args[0] in WRITERS or (args[0] == "serve" and any(a == "--watch" or a.startswith("--watch=") for a in args)))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--version"]:
        from searchengine import __version__

        print(f"searchengine {__version__}")
        return 0
    if takes_the_writer_lock(args):
        data_dir = data_dir_named(args[1:])
        if data_dir is not None:
            from searchengine.util.locks import busy_writer

            refusal = busy_writer(data_dir)
            if refusal is not None:
                print(f"searchengine: error: {refusal}", file=sys.stderr)
                return 1
    from searchengine.app.cli import main as cli_main

    code = cli_main(args)
    if any(t.is_alive() for t in threading.enumerate() if t is not threading.main_thread()):
        leave_now(code)
    return code


def leave_now(code: int) -> None:
    """End the process without waiting for the threads still running: after Ctrl-C, a model
    batch or a decode the command has given up on (its results are never written). Python
    would join them first (8-18 s for a batch of the real model on a CPU), and a thread still
    inside native code when the interpreter finalizes is what printed "terminate called
    without an active exception". The exit handlers still run (logs, temporary folders, a
    local Ray), and the streams are flushed; the threads' work is dropped, as a kill would
    drop it, which the index survives by design."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
