"""`searchengine serve` says at start when it listens beyond this machine without a key
(an empty key included); on loopback, or with a key, it says nothing of it."""

from __future__ import annotations

import pytest

from tests.inprocess import run_cli

WARNING = "without an API key: anyone who can reach it sees your photos"


@pytest.mark.parametrize("host, key, warned", [
    ("0.0.0.0", None, True),
    ("0.0.0.0", "", True),  # compose's default when SEARCHENGINE_API_KEY is unset
    ("0.0.0.0", "s3cret", False),
    ("127.0.0.1", "", False),
    ("localhost", None, False),
])
def test_serving_beyond_loopback_without_a_key_says_so(tmp_path, host, key, warned):
    env = {"SEARCHENGINE_DATA_DIR": str(tmp_path / "data")}
    if key is not None:
        env["SEARCHENGINE_API_KEY"] = key
    # No index here: the command stops right after its start-up checks, with a message.
    r = run_cli("serve", "--host", host, env=env)
    assert r.returncode != 0 and "no index in" in r.stderr, r.stderr
    assert (WARNING in r.stderr) == warned, r.stderr
