"""The `searchengine` command run in this process: the same `main`, argv, environment and
output as the real command, without paying a new Python and a fresh transformers import
(~6 s on a busy 2-core machine) for every call. Tests that need a real process (start-up,
signals, what a process imports) keep running the real command."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from typing import Mapping

from tests.helpers import is_setting


def run_cli(*args, env: Mapping[str, str] | None = None, clean: bool = True) -> subprocess.CompletedProcess:
    """`searchengine ARGS` with `env` on top of this process's environment (less every
    SEARCHENGINE_* variable when `clean`); returns what a subprocess run would."""
    from searchengine.app.cli import main

    saved = dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    try:
        if clean:
            for name in [n for n in os.environ if is_setting(n)]:
                del os.environ[name]
        os.environ.update({"HF_HUB_OFFLINE": "1", **(env or {})})
        argv = [str(a) for a in args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv, out=out, err=err)
            except SystemExit as e:  # argparse: --help, --version, a bad flag
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(["searchengine", *map(str, args)], code, out.getvalue(), err.getvalue())


def cli(*args, env_extra: Mapping[str, str] | None = None, check_rc: int | None = None) -> subprocess.CompletedProcess:
    """`tests.e2e.test_cli.cli`'s signature, in this process."""
    proc = run_cli(*args, env=env_extra)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc
