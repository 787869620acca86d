"""Fixtures: a tiny BLIP-2 model built offline, real photos, fresh data directories."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# torch's OpenMP (libgomp) worker threads spin while they wait for work. On a small machine
# that is busy with anything else, those spinning threads take the cores the real work needs:
# tiny-model training ran ~6x slower here (MODEL_NOTES: up to 15x), with identical numbers.
# libgomp reads this once, when torch loads it, so it is set before anything imports torch;
# the CLI and server processes the tests start inherit it through os.environ.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a network (read when the hub loads)
# The ONNX query encoders that `serve` exports (text_backend auto) go to one folder for the
# run, never to the cache in the home of whoever runs the tests.
os.environ["SEARCHENGINE_CACHE_DIR"] = tempfile.mkdtemp(prefix="searchengine-test-cache-")
atexit.register(shutil.rmtree, os.environ["SEARCHENGINE_CACHE_DIR"], ignore_errors=True)

import subprocess
import sys
from pathlib import Path

if "torch" in sys.modules:  # a plugin loaded torch first: the setting above came too late
    print("conftest: torch was imported before OMP_WAIT_POLICY was set; tests may run slowly", file=sys.stderr)

import pytest
import transformers

from searchengine.models.retrieval import RetrievalModel
from searchengine.config.settings import Settings
from searchengine.models.tiny import build_tiny_captioner, build_tiny_model
from tests.helpers import photos_in, settings_for

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-blip2"), seed=0)


@pytest.fixture(scope="session")
def tiny_captioner_dir(tmp_path_factory) -> Path:
    """A tiny BLIP captioner (the CPU default's family); its words are whole English words."""
    return build_tiny_captioner(tmp_path_factory.mktemp("tiny-blip"), kind="blip", seed=0)


@pytest.fixture(scope="session")
def captioner(tiny_captioner_dir):
    from searchengine.models.captioner import Captioner

    return Captioner.load(str(tiny_captioner_dir), device="cpu", dtype="float32", max_new_tokens=12)


@pytest.fixture(scope="session")
def colour_model_dir() -> Path:
    """The tiny model trained to see colour (tests/trained.py); cached between runs."""
    from tests.trained import colour_model

    return colour_model()


@pytest.fixture(scope="session")
def object_model_dir() -> Path:
    """The tiny model trained on two coloured squares a picture (tests/trained.py); cached."""
    from tests.trained import object_model

    return object_model()


@pytest.fixture(scope="session")
def model(tiny_model_dir) -> RetrievalModel:
    return RetrievalModel.load(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    """Debian's mate-backgrounds photos; fetched once into a cache folder."""
    try:
        out = subprocess.run(
            ["bash", str(ROOT / "tests" / "fetch_photos.sh")], check=True, capture_output=True, text=True, timeout=600
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"cannot fetch the test photos (Debian package mate-backgrounds): {e}")
    path = Path(out.stdout.strip().splitlines()[-1])
    assert len(list(path.rglob("*.jpg"))) >= 10, f"too few photos in {path}"
    return path


@pytest.fixture
def photo_files(photos_dir) -> list[Path]:
    return photos_in(photos_dir)


@pytest.fixture
def settings(tmp_path, tiny_model_dir) -> Settings:
    return settings_for(tmp_path / "data", tiny_model_dir)


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for the run (tests/pg.py), started on first use."""
    from tests.pg import Server

    server = Server()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """A new, empty store on each backend: a SQLite file, a PostgreSQL database."""
    from searchengine.store.connection import sqlite_url

    if request.param == "sqlite":
        return sqlite_url(tmp_path / "store.db")
    return request.getfixturevalue("postgres").new_database()
