"""The README's distributed form: a Ray head started with `ray start --head` (as compose's
`ray-head` runs it), and `searchengine index --runner ray --ray-address auto` run on a node
of that cluster (as compose's `ray-driver` runs it once it has joined). A Ray Client address
(ray://) is refused before anything loads: Ray Data does not run through Ray Client."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.inprocess import run_cli
from tests.server import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
EXE = str(Path(sys.executable).with_name("searchengine"))


@pytest.fixture
def ray_head():
    """A head node on this machine, in a temporary folder of its own (short: Ray's socket
    paths live under it), in a process group of its own; its GCS address. It is stopped by
    ending that group: `ray stop` would end every Ray on the machine, another worker's too."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    # Token authentication (Ray 2.5x): on whenever ~/.ray/auth_token exists, which a local
    # ray.init elsewhere in the suite may have written; a token of the cluster's own, given to
    # the head and to the node that drives it, whatever that file holds.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([RAY, "status", f"--address={address}"], env=env, capture_output=True, timeout=60).returncode:
            assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(1)
        yield address, env
    finally:
        # The head's own stop (it takes a few seconds), then whatever is left of its group.
        for sig, grace in ((signal.SIGTERM, 8), (signal.SIGKILL, 30)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
            time.sleep(1)
        shutil.rmtree(temp, ignore_errors=True)


def test_index_on_a_node_of_the_cluster_with_address_auto(ray_head, tiny_model_dir, photo_files, tmp_path):
    address, env = ray_head
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, f in enumerate(photo_files[:3]):
        (folder / f"{i}{f.suffix}").write_bytes(f.read_bytes())
    # `auto` finds the cluster this machine is a node of: RAY_ADDRESS names it here, because
    # another test's Ray instance may be running on this machine at the same time.
    env = {**env, "RAY_ADDRESS": address, "SEARCHENGINE_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([EXE, "index", str(folder), "--model", str(tiny_model_dir), "--no-captions",
                        "--runner", "ray", "--ray-address", "auto"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("3 indexed"), r.stdout
    stats = subprocess.run([EXE, "stats"], env=env, capture_output=True, text=True, timeout=300).stdout
    assert re.search(r"images +3 \(3 files\)", stats), stats


def test_a_ray_client_address_is_refused_before_anything_loads(tiny_model_dir, tmp_path):
    (tmp_path / "photos").mkdir()
    r = run_cli("index", tmp_path / "photos", "--model", tiny_model_dir, "--runner", "ray",
                "--ray-address", "ray://ray-head:10001", env={"SEARCHENGINE_DATA_DIR": str(tmp_path / "data")})
    assert r.returncode != 0 and "Ray Data does not run through Ray Client" in r.stderr, r.stderr
    assert "--ray-address auto" in r.stderr
    assert not (tmp_path / "data").exists()
    # `auto` (and no address) is what $RAY_ADDRESS says, for Ray: a Ray Client one there too.
    r = run_cli("index", tmp_path / "photos", "--model", tiny_model_dir, "--runner", "ray", "--ray-address", "auto",
                env={"SEARCHENGINE_DATA_DIR": str(tmp_path / "data"), "RAY_ADDRESS": "RAY://ray-head:10001"})
    assert r.returncode != 0 and "RAY://ray-head:10001: Ray Data does not run through Ray Client" in r.stderr, r.stderr
    assert not (tmp_path / "data").exists()
