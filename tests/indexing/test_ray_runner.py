"""The Ray Data runner on a local Ray instance that the tests start (2 CPUs, tiny models): it
indexes what the local runner indexes, and a worker that dies mid-run costs a retry, never an
image or a duplicate."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from searchengine.indexing.pipeline import Indexer
from searchengine.app import wiring
from searchengine.indexing.ray_runner import Loaders, RayRunner
from searchengine.indexing.scan import scan_folder
from searchengine.indexing.stages import DecodeStage
from searchengine.errors import SearchEngineError
from searchengine.media.keywords import parse_query
from searchengine.library import Library
from tests.images import write_bad

LOADERS = Loaders(wiring.load_model, wiring.load_captioner)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    env = {"PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=200 * 1024**2, runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


def _library(settings, tmp_path: Path, name: str):
    s = settings.model_copy(update={"data_dir": tmp_path / name, "caption_max_tokens": 12})
    return s, Library.open(s, create=True)


def _contents(library: Library) -> dict[str, tuple]:
    """path -> (caption, vectors, width, height) of every indexed file."""
    ids = [int(i) for i in library.indexed_ids()]
    records = library.catalog.images(ids)
    out = {}
    for image_id, record in records.items():
        for path in record.paths:
            out[path] = (record.caption, library.vectors_of(image_id), record.width, record.height)
    return out


def _folder(tmp_path: Path, photo_files: list[Path]) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, f in enumerate(photo_files[:6]):
        (folder / f"{i}{f.suffix}").write_bytes(f.read_bytes())
    (folder / "copy.jpg").write_bytes((folder / f"0{photo_files[0].suffix}").read_bytes())  # the same content twice
    write_bad(folder / "bad", photo_files[0].read_bytes())
    return folder


def recording_scanner(folder, *, record: str, **listing):
    """scan_folder, noting which process listed the folder."""
    Path(record, Path(folder).name).write_text(str(os.getpid()))
    return scan_folder(folder, **listing)


def test_the_ray_run_indexes_what_the_local_run_does(local_ray, settings, model, captioner, photo_files, tmp_path):
    folder = _folder(tmp_path, photo_files)
    (folder / "loop").symlink_to(folder, target_is_directory=True)  # a link back up: not followed, reported
    second = tmp_path / "more"
    second.mkdir()
    (second / "one.jpg").write_bytes(photo_files[7].read_bytes())
    s_local, local = _library(settings, tmp_path, "local")
    s_ray, on_ray = _library(settings, tmp_path, "ray")
    listed_by = tmp_path / "listed-by"
    listed_by.mkdir()
    try:
        a = Indexer(model, local, s_local, captioner=captioner).run([folder, second])
        scanner = functools.partial(recording_scanner, record=str(listed_by))
        b = Indexer(model, on_ray, s_ray, captioner=captioner, scanner=scanner, runner=RayRunner(s_ray, LOADERS, actors=1)).run([folder, second])
        # Each folder was listed by a Ray task, in a worker process.
        pids = {p.name: int(p.read_text()) for p in listed_by.iterdir()}
        assert set(pids) == {"photos", "more"} and os.getpid() not in pids.values()
        assert (b.indexed, b.linked, b.captioned, dict(b.failed)) == (a.indexed, a.linked, a.captioned, dict(a.failed))
        assert b.links_skipped == a.links_skipped == 1
        assert a.indexed == 7 and a.linked == 1 and set(a.failed) == {"empty", "truncated", "not_an_image", "too_large"}
        want, got = _contents(local), _contents(on_ray)
        assert sorted(got) == sorted(want)
        for path, (caption, vectors, w, h) in want.items():
            g = got[path]
            assert (g[0], g[2], g[3]) == (caption, w, h), path
            np.testing.assert_allclose(g[1], vectors, atol=1e-5)
        # The text index: the same files for a word of the captions, and for a folder's name.
        word = next(c for c, *_ in want.values() if c).split()[0]
        for query in (word, "photos"):
            hits = lambda lib: sorted(p for h in lib.catalog.keyword_search(parse_query(query), 50, None) for p in lib.catalog.images([h.image_id])[h.image_id].paths)
            assert hits(on_ray) == hits(local) and hits(local), query
        # A second run changes nothing: the workers were told what the library has.
        again = Indexer(model, on_ray, s_ray, captioner=captioner, runner=RayRunner(s_ray, LOADERS, actors=1)).run([folder, second])
        assert (again.indexed, again.linked, again.unchanged) == (0, 0, 8 + 4)
    finally:
        local.close(), on_ray.close()


@dataclass(frozen=True)
class DiesOnce(DecodeStage):
    """A decode stage whose worker process dies the first time it decodes (marker: a file)."""

    marker: str = ""

    def __call__(self, item):
        if os.path.exists(self.marker):
            os.unlink(self.marker)
            os._exit(1)  # the worker process dies, mid-batch
        return super().__call__(item)


def test_a_worker_that_dies_mid_run_is_retried_and_nothing_is_written_twice(local_ray, settings, model, photo_files, tmp_path):
    folder = _folder(tmp_path, photo_files)
    s, library = _library(settings, tmp_path, "data")
    marker = tmp_path / "die"
    marker.write_text("once")
    try:
        indexer = Indexer(model, library, s, runner=RayRunner(s, LOADERS, actors=1, read_batch=2))
        d = indexer.decode_stage
        indexer.decode_stage = DiesOnce(d.preprocess, d.max_pixels, d.thumbnail_size, d.thumbnail_quality,
                                        d.caption_preprocess, d.decode, d.device, marker=str(marker))
        summary = indexer.run([folder])
        assert not marker.exists()  # a worker did die
        assert (summary.indexed, summary.linked) == (6, 1)
        contents = _contents(library)
        assert len(contents) == 7 and len(library.indexed_ids()) == 6  # every file, each image once
    finally:
        library.close()


def test_folders_the_workers_cannot_read_are_named(local_ray, settings, model, tmp_path, monkeypatch):
    import searchengine.indexing.ray_runner as rr

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"x")
    real = rr.unreadable_on_workers
    monkeypatch.setattr(rr, "unreadable_on_workers", lambda paths: paths[0])  # as a node without the share sees it
    s, library = _library(settings, tmp_path, "data")
    try:
        with pytest.raises(SearchEngineError, match=r"cannot read .*a\.jpg.*same path"):
            Indexer(model, library, s, runner=RayRunner(s, LOADERS, actors=1)).run([folder])
    finally:
        library.close()
    assert real([str(folder / "a.jpg")]) is None  # really asked of a worker
    assert real([str(folder / "a.jpg"), str(tmp_path / "nowhere.jpg")]) == str(tmp_path / "nowhere.jpg")


@pytest.mark.dtype
def test_the_index_command_runs_on_ray(local_ray, tiny_model_dir, photo_files, tmp_path, monkeypatch):
    from tests.inprocess import run_cli

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, f in enumerate(photo_files[:3]):
        (folder / f"{i}{f.suffix}").write_bytes(f.read_bytes())
    env = {"SEARCHENGINE_DATA_DIR": str(tmp_path / "data")}
    # bf16, as on GPU nodes: the actors' vectors are recorded as theirs, and a float32 search reads them.
    r = run_cli("index", folder, "--model", tiny_model_dir, "--no-captions", "--runner", "ray", "--dtype", "bfloat16", env=env)
    assert r.returncode == 0, r.stderr
    assert "3 indexed" in r.stdout and "waiting for the cluster" in r.stdout
    stats = run_cli("stats", env=env).stdout
    assert re.search(r"images +3 \(3 files\)", stats) and "vectors by   the model in bfloat16 on cpu" in stats
    assert run_cli("search", "a", "photo", "--dtype", "float32", env=env).returncode == 0

    import importlib

    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: (_ for _ in ()).throw(ImportError(name)) if name.startswith("ray") else real(name, *a))
    r = run_cli("index", folder, "--model", tiny_model_dir, "--runner", "ray", env={"SEARCHENGINE_DATA_DIR": str(tmp_path / "other")})
    assert r.returncode != 0 and "pip install 'searchengine[ray]'" in r.stderr
    assert not (tmp_path / "other").exists()  # refused before anything loads or is created


def test_decode_device_runs_on_the_workers_cpus_whatever_the_drivers_device(local_ray, settings, model, photo_files, tmp_path):
    """With decode "device" and the driver's model on a GPU, the CPU workers decode as the CPU
    path does (they have no GPU to decode on): every photo indexed, none failed."""
    from dataclasses import replace

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, f in enumerate(photo_files[:3]):
        (folder / f"{i}{f.suffix}").write_bytes(f.read_bytes())
    s, library = _library(settings, tmp_path, "data")
    try:
        indexer = Indexer(model, library, s, runner=RayRunner(s, LOADERS, actors=1))
        indexer.decode_stage = replace(indexer.decode_stage, decode="device", device="cuda:0")  # as on a GPU driver
        summary = indexer.run([folder])
        assert (summary.indexed, dict(summary.failed)) == (3, {})
    finally:
        library.close()
