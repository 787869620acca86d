"""Ctrl-C and stop signals (issue 27 G.14, G.17): `index` and `watch` end at once, even with
a model batch on its way (it took 8-18 s for the real model on a CPU, and `watch` 12 s), say
what they did, and leave an index the next run completes.

A model batch that takes a minute stands in for the real model: the real command runs in a
fresh process whose `Indexer._compute` sleeps first and says when it has started."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from searchengine.indexing.pipeline import Indexer, Stopped, Summary
from searchengine.indexing.scan import FileEntry
from searchengine.indexing.watch import Watcher
from searchengine.library import Library
from tests.inprocess import run_cli
from tests.helpers import is_setting

pytestmark = pytest.mark.slow  # real processes and waits

SLOW_BATCH = """
import sys, time
from searchengine.indexing import pipeline
compute = pipeline.Indexer._compute
def slow(self, *a, **kw):
    print("computing", flush=True)
    time.sleep(60)
    return compute(self, *a, **kw)
pipeline.Indexer._compute = slow
from searchengine.app.entry import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def start():
    """subprocess.Popen, and every process it started killed when the test ends: a test that
    failed midway left its watcher running (one was found an hour later)."""
    procs: list[subprocess.Popen] = []

    def popen(*args, **kwargs) -> subprocess.Popen:
        procs.append(subprocess.Popen(*args, **kwargs))
        return procs[-1]

    yield popen
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _env(settings) -> dict:
    import os

    return {**{k: v for k, v in os.environ.items() if not is_setting(k)}, "SEARCHENGINE_DATA_DIR": str(settings.data_dir),
            "SEARCHENGINE_MODEL": settings.model, "SEARCHENGINE_CAPTIONS": "false", "SEARCHENGINE_DEVICE": "cpu",
            "SEARCHENGINE_DTYPE": "float32", "SEARCHENGINE_BATCH_SIZE": "2"}


def _photos(tmp_path, photo_files, n: int):
    folder = tmp_path / "photos"
    folder.mkdir(exist_ok=True)
    for p in photo_files[:n]:
        shutil.copy(p, folder / p.name)
    return folder


def _interrupt_when_computing(proc: subprocess.Popen) -> tuple[float, str, str]:
    """SIGINT once a model batch has started; (seconds until the process ended, stdout, stderr)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.strip() == "computing":
            break
    else:
        raise AssertionError("no batch started: " + "".join(lines) + proc.stderr.read())
    t = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return time.perf_counter() - t, "".join(lines) + out, err


def test_ctrl_c_ends_index_at_once_and_the_next_run_completes_it(tmp_path, settings, photo_files, start):
    folder = _photos(tmp_path, photo_files, 6)
    env = _env(settings)
    proc = start([sys.executable, "-c", SLOW_BATCH, "index", str(folder)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    took, out, err = _interrupt_when_computing(proc)
    assert proc.returncode == 130, err
    assert took < 2, took  # the batch on its way (a minute here) is not waited for
    assert "searchengine: interrupted" in err and "terminate called" not in err, err
    # The next run and the check: the same commands in this process (what was interrupted
    # needed a real one; completing it is the command's work).
    again = run_cli("index", folder, env=env, clean=False)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("6 indexed, 0 duplicates linked, 0 unchanged, 0 removed, 0 skipped"), again.stdout
    check = run_cli("check", env=env, clean=False)
    assert check.returncode == 0 and "vector index against the store: 6 images' vectors compared, all the same" in check.stdout, check.stdout


def test_ctrl_c_ends_watch_within_two_seconds_and_says_what_it_did(tmp_path, settings, photo_files, start):
    folder = _photos(tmp_path, photo_files, 1)
    env = _env(settings)
    proc = start([sys.executable, "-m", "searchengine.app.entry", "watch", str(folder), "--debounce", "0.2"], env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    assert first.startswith("caught up: 1 indexed, 0 linked, 0 moved, 0 unchanged, 0 removed, 0 skipped; watching "), first
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)  # the watcher logs each file
    reader.start()
    shutil.copy(photo_files[1], folder / "new.jpg")
    deadline = time.monotonic() + 30
    while not any("indexed " in line and "new.jpg" in line for line in log):
        assert time.monotonic() < deadline and proc.poll() is None, "the new photo was never indexed: " + "".join(log)
        time.sleep(0.1)
    t = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    out = proc.stdout.read()
    proc.wait(timeout=30)
    reader.join(10)
    err = "".join(log)
    assert proc.returncode == 0 and time.perf_counter() - t < 2, err
    assert out.strip().splitlines()[-1] == "stopped watching: since catching up 1 indexed, 0 linked, 0 moved, 0 removed, 0 skipped", out

    # With a model batch on its way: still within 2 s, and its files are the next start's.
    proc = start([sys.executable, "-c", SLOW_BATCH, "watch", str(folder), "--debounce", "0.2"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith("caught up: 0 indexed")
    shutil.copy(photo_files[2], folder / "newer.jpg")
    took, out, err = _interrupt_when_computing(proc)
    assert proc.returncode == 0 and took < 2, (took, err)
    assert out.strip().splitlines()[-1].endswith("; 1 changed file left for the next start"), out
    assert "terminate called" not in err, err
    proc = start([sys.executable, "-m", "searchengine.app.entry", "watch", str(folder)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith("caught up: 1 indexed, 0 linked, 0 moved, 2 unchanged"), proc.stderr
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_stop_ends_an_update_between_batches_and_commits_nothing_half_done(tmp_path, settings, model, photo_files, monkeypatch):
    """The watcher's stop, in this process: an update whose batch is still computing ends
    without it (Stopped), the batches before it stay committed, and nothing waits."""
    folder = _photos(tmp_path, photo_files, 5)
    library = Library.open(settings, create=True)
    indexer = Indexer(model, library, settings)
    started, release = threading.Event(), threading.Event()
    compute = Indexer._compute
    calls = []

    def gated(self, batch, *a, **kw):
        calls.append(len(batch))
        if len(calls) == 2:  # the second batch hangs until released
            started.set()
            release.wait(30)
        return compute(self, batch, *a, **kw)

    monkeypatch.setattr(Indexer, "_compute", gated)
    entries = [FileEntry(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())]
    outcome = {}

    def run():
        try:
            indexer.update(entries, [], Summary())
        except Stopped:
            outcome["stopped"] = True

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(30)
    t = time.perf_counter()
    indexer.stop()
    thread.join(5)
    assert not thread.is_alive() and outcome == {"stopped": True}
    assert time.perf_counter() - t < 1
    release.set()
    assert library.image_count() == calls[0] == 4  # the first batch (settings.batch_size), committed
    library.close()


def test_a_watcher_that_was_stopped_says_so_and_counts_since_its_start(tmp_path, settings, model, photo_files):
    folder = _photos(tmp_path, photo_files, 1)
    library = Library.open(settings, create=True)
    watcher = Watcher(Indexer(model, library, settings), [folder], poll=True, debounce_s=0.1, poll_interval_s=0.1)
    assert watcher.start().indexed == 1
    shutil.copy(photo_files[1], folder / "b.jpg")
    deadline = time.monotonic() + 20
    while watcher.since_start.indexed < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    (folder / "b.jpg").unlink()
    while watcher.since_start.removed < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert watcher.stop(timeout_s=1.5) and watcher.left == 0
    assert (watcher.since_start.indexed, watcher.since_start.removed) == (1, 1)
    library.close()
