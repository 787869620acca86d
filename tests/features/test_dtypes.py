"""An index is its model's weights, not the dtype or device they ran in: built in one dtype,
searched and extended in another, as a GPU-built index is searched on a CPU (on a CPU with
avx512_bf16, `dtype auto` is bfloat16, as on every GPU)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.inprocess import run_cli

pytestmark = pytest.mark.dtype


def _pictures(folder, n, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"p{seed}-{i}.png")
    return folder


def _env(tmp_path):
    return {"SEARCHENGINE_DATA_DIR": str(tmp_path / "data")}


def _search(env, *flags):
    r = run_cli("search", "a", "photo", "--mode", "semantic", "--json", "-k", "5", *flags, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["results"]


def _stats(env):
    r = run_cli("stats", "--json", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("built, searched", [("float32", "bfloat16"), ("bfloat16", "float32")])
def test_an_index_built_in_one_dtype_is_searched_and_extended_in_another(tmp_path, tiny_model_dir, built, searched):
    """Was refused: "this index was built with model 'M' (fingerprint 67fb...); 'M' (fingerprint
    141d...) is a different model. Use --model M"."""
    env = _env(tmp_path)
    folder = _pictures(tmp_path / "pics", 4, seed=1)
    r = run_cli("index", folder, "--model", tiny_model_dir, "--no-captions", "--dtype", built, env=env)
    assert r.returncode == 0, r.stderr
    for flags in (("--dtype", searched), ("--dtype", searched, "--model", str(tiny_model_dir))):
        hits = _search(env, *flags)
        assert len(hits) == 4 and all(h["itm"] is not None for h in hits)
    _pictures(folder, 2, seed=2)
    r = run_cli("index", "--dtype", searched, env=env)
    assert r.returncode == 0, r.stderr
    stats = _stats(env)
    assert stats["images"] == 6 and stats["model_dtype"] == built
    assert stats["made_by"] == [f"{built} on cpu", f"{searched} on cpu"]


def test_an_index_an_earlier_version_built_in_bf16_opens_and_is_brought_up_to_date(tmp_path, tiny_model_dir):
    """Before, a bf16 run recorded the fingerprint of the bf16-rounded query tokens."""
    from sqlalchemy import create_engine, text

    from searchengine.models.retrieval import RetrievalModel

    env = _env(tmp_path)
    r = run_cli("index", _pictures(tmp_path / "pics", 3, seed=3), "--model", tiny_model_dir, "--no-captions",
                "--dtype", "bfloat16", env=env)
    assert r.returncode == 0, r.stderr
    model = RetrievalModel.load(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    old = model_fingerprint_in_bf16(model)
    engine = create_engine(f"sqlite:///{tmp_path / 'data' / 'store.db'}")
    with engine.begin() as conn:
        raw = json.loads(conn.execute(text("SELECT value FROM meta WHERE key = 'model'")).scalar())
        assert raw["fingerprint"] == model.fingerprint != old
        raw["fingerprint"] = old
        del raw["device"]  # an earlier version recorded neither the device nor made_by
        conn.execute(text("UPDATE meta SET value = :v WHERE key = 'model'"), {"v": json.dumps(raw)})
        conn.execute(text("DELETE FROM meta WHERE key = 'made_by'"))
    assert len(_search(env, "--dtype", "float32")) == 3  # reading: the same model
    assert run_cli("index", "--dtype", "float32", env=env).returncode == 0  # a writer brings the record up to date
    stats = _stats(env)
    assert stats["model_fingerprint"] == model.fingerprint and stats["made_by"] == ["bfloat16"]  # as it recorded it
    engine.dispose()


def model_fingerprint_in_bf16(model):
    import torch

    from searchengine.models.retrieval import fingerprint

    return fingerprint(model.model.config, model.model.query_tokens.detach().to(torch.bfloat16).float().numpy())


def test_a_real_mismatch_says_what_differs(tmp_path, tiny_model_dir):
    from searchengine.models.tiny import build_tiny_model

    env = _env(tmp_path)
    mine = shutil.copytree(tiny_model_dir, tmp_path / "mine")
    assert run_cli("index", _pictures(tmp_path / "pics", 2, seed=4), "--model", mine, "--no-captions", env=env).returncode == 0
    other = build_tiny_model(tmp_path / "other", seed=5)
    r = run_cli("search", "a", "photo", "--model", other, env=env)
    assert r.returncode != 0 and f"--model {str(other)!r} is another checkpoint" in r.stderr and "Traceback" not in r.stderr
    shutil.rmtree(mine)
    shutil.copytree(other, mine)  # other weights at the same path
    r = run_cli("search", "a", "photo", env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"the weights of model {str(mine)!r} have changed since this index was built" in r.stderr
    assert f"--model {mine} or another --data-dir" not in r.stderr  # the flag already in use
