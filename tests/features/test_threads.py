"""Threads that cooperate: torch's waiting threads sleep, and on a GPU machine torch keeps
few CPU threads (the cores decode photos)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from searchengine.app import wiring
from searchengine.config.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # real processes: what the CLI sets before torch loads
def test_the_cli_makes_waiting_openmp_threads_sleep_unless_told_otherwise(tmp_path):
    code = (
        "import os, sys; from searchengine.app.cli import main;"
        f"main(['stats', '--data-dir', {str(tmp_path / 'none')!r}], out=sys.stderr, err=sys.stderr);"
        "print(os.environ.get('OMP_WAIT_POLICY'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, check=True)
    assert got.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # a user's own choice is kept
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, check=True)
    assert got.stdout.strip() == "ACTIVE"


def test_torch_threads_follow_the_device_or_the_setting():
    import torch

    before = torch.get_num_threads()
    try:
        wiring.use_threads(Settings(), "cuda:0")
        assert torch.get_num_threads() == 2  # a GPU machine: the cores are the decoders'
        wiring.use_threads(Settings(torch_threads=1), "cuda:0")
        assert torch.get_num_threads() == 1
        torch.set_num_threads(before)
        wiring.use_threads(Settings(), "cpu")  # a CPU: torch's own default, untouched
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
