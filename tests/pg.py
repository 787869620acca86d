"""A real PostgreSQL server for the tests, started by them: Debian's server binaries
(`initdb`, `pg_ctl`), a cluster in a temporary folder, listening on a Unix socket only. The
server refuses to run as root, so as root it runs as the `postgres` user."""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

_names = itertools.count()


def binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


class Server:
    def __init__(self) -> None:
        bindir = binaries()
        if bindir is None:
            raise RuntimeError("PostgreSQL's server binaries are not installed (apt-get install postgresql)")
        self.bin = bindir
        self.root = Path(tempfile.mkdtemp(prefix="searchengine-pg-"))
        self.data, self.socket = self.root / "data", self.root / "socket"
        self.socket.mkdir()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            os.chmod(self.root, 0o755)
            shutil.chown(self.socket, "postgres")
            os.chmod(self.socket, 0o777)
            self.data.mkdir()
            shutil.chown(self.data, "postgres")
        self._run(self.bin / "initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "--no-sync", "--locale=C.UTF-8", "-E", "UTF8")
        self.start()

    def start(self) -> None:
        self._run(
            self.bin / "pg_ctl", "-D", self.data, "-w", "-l", self.data / "server.log",
            "-o", f"-k {self.socket} -c listen_addresses='' -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            "start",
        )

    def kill(self) -> None:
        """Stop the server at once, as a crash would (its data kept: `start` brings it back)."""
        self._run(self.bin / "pg_ctl", "-D", self.data, "-m", "immediate", "stop")

    def _run(self, *args) -> None:
        cmd = [str(a) for a in args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, text=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@/{database}?host={self.socket}"

    def new_database(self) -> str:
        """The URL of a new, empty database on this server."""
        from sqlalchemy import create_engine, text

        name = f"t{os.getpid()}_{next(_names)}"
        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}"))
        engine.dispose()
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run(self.bin / "pg_ctl", "-D", self.data, "-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass  # not running (killed by a test that then failed)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
