"""End to end through the real `searchengine` command: what lies on disk (read-only indexes,
image formats, symlinked folders) and how the commands report it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.inprocess import run_cli
from tests.readonly import read_only_view

pytestmark = pytest.mark.slow  # real processes, mounts and waits

EXE = str(Path(sys.executable).with_name("searchengine"))


def cli(*args, env_extra=None) -> subprocess.CompletedProcess:
    """The command in this process (see tests/inprocess.py): what these tests look at is what
    it does with the files, not how a process starts."""
    return run_cli(*args, env={"HF_HUB_OFFLINE": "1", **(env_extra or {})}, clean=False)


def _colour_photos(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for colour in ("red", "green", "blue"):
        Image.new("RGB", (64, 48), colour).save(folder / f"{colour}_square.jpg")


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("cli-files")
    _colour_photos(root / "photos")
    env = {"SEARCHENGINE_MODEL": str(tiny_model_dir), "SEARCHENGINE_CAPTIONS": "false"}
    proc = cli("index", root / "photos", "--data-dir", root / "data", "--device", "cpu", env_extra=env)
    assert proc.returncode == 0, proc.stderr
    assert "3 indexed" in proc.stdout
    shutil.rmtree(root / "data" / "thumbnails")  # so that serving must make them elsewhere
    return {"root": root, "env": env}


@pytest.fixture(scope="module")
def read_only(indexed):
    """The index seen through a read-only mount (or made immutable)."""
    root = indexed["root"]
    with read_only_view(root / "data", root / "ro") as view:
        yield view


def test_stats_on_a_read_only_index(indexed, read_only):
    proc = cli("stats", "--json", "--data-dir", read_only, env_extra=indexed["env"])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["images"] == 3 and data["vectors"] == 3 * 8  # the tiny model's 8 query vectors


@pytest.mark.parametrize("mode", ["keyword", "semantic"])
def test_search_on_a_read_only_index(indexed, read_only, mode):
    proc = cli("search", "red square", "--json", "--mode", mode, "--data-dir", read_only, "--device", "cpu",
               env_extra=indexed["env"])
    assert proc.returncode == 0, proc.stderr
    paths = [r["path"] for r in json.loads(proc.stdout)["results"]]
    assert paths[0].endswith("red_square.jpg")
    if mode == "semantic":
        assert len(paths) == 3


def test_serve_on_a_read_only_index(indexed, read_only, tiny_model_dir, tmp_path):
    from tests.server import env_for, get, running_server

    with running_server(env_for(tiny_model_dir, read_only), tmp_path / "serve.log") as (base, _):
        status, body = get(f"{base}/api/search?q=red+square&k=3")
        assert status == 200, body
        hits = json.loads(body)["hits"]
        assert len(hits) == 3
        status, thumb = get(base + hits[0]["thumbnail_url"])
        assert status == 200 and thumb[:2] == b"\xff\xd8"  # made outside the read-only folder
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
    assert not (read_only / "thumbnails").exists()


@pytest.mark.parametrize(
    "command",
    [["index", "{photos}"], ["watch", "{photos}"], ["caption", "--caption-model", "x"], ["serve", "--watch", "{photos}"]],
    ids=["index", "watch", "caption", "serve-watch"],
)
def test_write_commands_refuse_a_read_only_index_in_one_line(indexed, read_only, command):
    photos = indexed["root"] / "photos"
    args = [a.format(photos=photos) for a in command]
    proc = cli(*args, "--data-dir", read_only, env_extra=indexed["env"])
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"searchengine: error: {read_only} is not writable, and this command writes to the index in {read_only}: "
        "make it writable (a read-only mount or a backup can be searched, not updated), "
        "or pass --data-dir with a writable folder"
    ], proc.stderr


def test_iphone_heic_and_avif_photos_are_indexed(tmp_path, tiny_model_dir):
    import pillow_heif

    from tests.images import gradient

    pillow_heif.register_heif_opener()
    photos = tmp_path / "iphone"
    photos.mkdir()
    Image.fromarray(gradient()).save(photos / "IMG_5001.HEIC", "HEIF", quality=90)
    Image.fromarray(gradient()[:, ::-1].copy()).save(photos / "IMG_5002.avif", "AVIF", quality=90)
    proc = cli("index", photos, "--data-dir", tmp_path / "data", "--device", "cpu", "--no-captions",
               env_extra={"SEARCHENGINE_MODEL": str(tiny_model_dir)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("2 indexed, 0 duplicates linked, 0 unchanged, 0 removed, 0 skipped;"), proc.stdout


def test_index_follows_folder_links_and_says_how_many_it_did_not(tmp_path, tiny_model_dir):
    from tests.indexing.test_scan import linked_tree

    root, _ = linked_tree(tmp_path)
    proc = cli("index", root, "--data-dir", tmp_path / "data", "--device", "cpu", "--no-captions",
               env_extra={"SEARCHENGINE_MODEL": str(tiny_model_dir)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(
        "3 indexed, 0 duplicates linked, 0 unchanged, 0 removed, 0 skipped, "
        "4 folder links not followed (loops or already listed); "
    ), proc.stdout
    assert f"skipping {root / 'sub' / 'up'}: folder link not followed: it leads back" in proc.stderr
