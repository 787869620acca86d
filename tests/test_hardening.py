"""Hardening: one indexer per data dir, and files served only while they are what was indexed."""

from __future__ import annotations

import os
import shutil
import time

from fastapi.testclient import TestClient

from indexer.pipeline import Indexer
from searchengine.api import create_app
from searchengine.library import Library, writer_lock
from tests.test_cli import cli


def test_a_second_indexer_on_the_same_data_dir_is_refused_in_one_line(tmp_path, settings, photo_files):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(photo_files[0], folder / "a.jpg")
    env = {"SEARCHENGINE_MODEL": settings.model, "SEARCHENGINE_DATA_DIR": str(settings.data_dir),
           "SEARCHENGINE_CAPTIONS": "false"}
    with writer_lock(settings, "watch ~/Pictures", create=True):
        for args in (["index", folder], ["caption", "--caption-model", "x"], ["restore"]):
            proc = cli(*args, env_extra=env)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 1 and len(lines) == 1, proc.stderr
            assert "another indexer is running" in lines[0] and "searchengine watch ~/Pictures" in lines[0]
        assert cli("stats", env_extra=env).returncode == 1  # readers are not locked out ("no index" here)
    assert "1 indexed" in cli("index", folder, env_extra=env, check_rc=0).stdout  # free again


def test_a_file_that_changed_or_a_link_pointed_elsewhere_is_never_served(settings, model, tmp_path, photo_files):
    folder = tmp_path / "photos"
    folder.mkdir()
    real = tmp_path / "elsewhere.jpg"
    shutil.copy(photo_files[0], real)
    (folder / "linked.jpg").symlink_to(real)
    shutil.copy(photo_files[1], folder / "edited.jpg")
    library = Library.open(settings, create=True)
    Indexer(model, library, settings).run([folder])
    ids = {os.path.basename(p): s.image_id for p, s in library.store.files_under(str(folder)).items()}
    library.close()
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2\n")

    with TestClient(create_app(settings, loader=lambda s: (model, Library.open(s)))) as client:
        for _ in range(300):
            if client.get("/healthz").status_code == 200:
                break
            time.sleep(0.05)
        linked, edited = ids["linked.jpg"], ids["edited.jpg"]
        assert client.get(f"/api/images/{linked}/file").content == real.read_bytes()
        (folder / "linked.jpg").unlink()
        (folder / "linked.jpg").symlink_to(secret)  # re-pointed after indexing
        with open(folder / "edited.jpg", "ab") as f:  # changed since it was indexed
            f.write(b"\0" * 100)
        for image_id in (linked, edited):
            for what in ("file", "preview"):
                r = client.get(f"/api/images/{image_id}/{what}")
                assert r.status_code == 404 and "indexed content" in r.json()["error"], r.text
                assert b"hunter2" not in r.content
