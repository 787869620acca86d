"""A real read-only view of a folder, for tests that run as root (which ignores file modes).

As root: a read-only bind mount (the folder as a NAS or a backup mount shows it); where mounts
are not allowed, the immutable attribute (`chattr +i`). As another user: `chmod -R a-w`.
Every one of these makes writes fail with an OS error, so the code under test meets the same
refusal a user's read-only index gives. If none can be had, the test is skipped and says why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest


def _run(*cmd: str) -> bool:
    return shutil.which(cmd[0]) is not None and subprocess.run(cmd, capture_output=True).returncode == 0


def _probe_is_read_only(folder: Path) -> bool:
    try:
        (folder / ".write-probe").write_bytes(b"")
    except OSError:
        return True
    (folder / ".write-probe").unlink()
    return False


@contextmanager
def read_only_view(folder: Path, mountpoint: Path) -> Iterator[Path]:
    """Yield a path showing `folder` read-only (`mountpoint`, or `folder` itself); undo on exit."""
    folder = Path(folder).resolve()
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        subprocess.run(["chmod", "-R", "a-w", str(folder)], check=True)
        try:
            yield folder
        finally:
            for p, mode in modes.items():
                os.chmod(p, mode)
        return
    mountpoint.mkdir(parents=True, exist_ok=True)
    if _run("mount", "--bind", str(folder), str(mountpoint)):
        try:
            if not _run("mount", "-o", "remount,ro,bind", str(mountpoint)) or not _probe_is_read_only(mountpoint):
                pytest.skip("a bind mount could be made but not made read-only here")
            yield mountpoint
        finally:
            subprocess.run(["umount", str(mountpoint)], check=True)
        return
    if _run("chattr", "-R", "+i", str(folder)):
        try:
            if not _probe_is_read_only(folder):
                pytest.skip("chattr +i does not stop writes on this file system")
            yield folder
        finally:
            subprocess.run(["chattr", "-R", "-i", str(folder)], check=True)
        return
    pytest.skip("cannot make a read-only folder as root here: neither a bind mount nor chattr +i is allowed")
