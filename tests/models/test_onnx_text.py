"""text_backend onnx: the query encoder exported to ONNX and run by ONNX Runtime gives the
ITC vectors PyTorch gives (cosine >= 0.9999 per vector, any batch and length), is exported
once per model, and is refused with a clear message where ONNX Runtime is missing."""

from __future__ import annotations

import sys

import numpy as np
import torch
import pytest

from searchengine.errors import ModelLoadError
from searchengine.models.onnx_text import OnnxTextEncoder

pytestmark = pytest.mark.dtype

TEXTS = ["a dog", "a red car parked by the sea at sunset with people walking", "x", "two yellow flowers in a garden"]


def test_onnx_vectors_equal_torch_s_for_any_batch_and_length(model, tiny_model_dir, tmp_path):
    from searchengine.models.retrieval import RetrievalModel

    want = model.embed_texts(TEXTS)
    # The backend is chosen as the model loads (what `wiring.load_model` passes).
    on_onnx = RetrievalModel.load(str(tiny_model_dir), device="cpu", dtype="float32",
                                  text_encoder=lambda m: OnnxTextEncoder(m, tmp_path, threads=1))
    assert isinstance(on_onnx.onnx_text, OnnxTextEncoder) and model.onnx_text is None
    got = on_onnx.embed_texts(TEXTS)
    one = on_onnx.embed_texts(TEXTS[1:2])
    cos = (got * want).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert got.shape == want.shape and cos.min() >= 0.9999, cos
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(one[0], got[1], atol=1e-5)  # batch size and padding change nothing


def test_the_export_is_made_once_per_model(model, tmp_path):
    first = OnnxTextEncoder(model, tmp_path, threads=1)
    stamp = first.path.stat().st_mtime_ns
    assert first.path.name == f"text-{model.fingerprint}.onnx"
    again = OnnxTextEncoder(model, tmp_path, threads=1)
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no temporary file left behind
    assert all(p.requires_grad for p in model.model.parameters()) or not any(p.requires_grad for p in model.model.parameters())


def test_without_onnx_runtime_it_says_what_to_install(model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ModelLoadError, match="pip install onnxruntime"):
        OnnxTextEncoder(model, tmp_path)


def test_wiring_uses_it_on_a_cpu_when_asked(settings, tmp_path, monkeypatch):
    from searchengine.app import wiring

    monkeypatch.setenv("SEARCHENGINE_CACHE_DIR", str(tmp_path / "cache"))
    loaded = wiring.load_model(settings.model_copy(update={"text_backend": "onnx"}), settings.model)
    assert isinstance(loaded.onnx_text, OnnxTextEncoder) and (tmp_path / "cache" / "onnx").is_dir()
    assert wiring.load_model(settings, settings.model).onnx_text is None  # one-off commands: torch
    torch_only = settings.model_copy(update={"text_backend": "torch"})
    assert wiring.load_model(torch_only, settings.model, serving=True).onnx_text is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("slower", ["onnx", "torch"])
def test_auto_in_a_server_takes_the_backend_that_measured_faster(settings, tmp_path, monkeypatch, caplog, dtype, slower):
    """text_backend auto (the default) in `serve` on a CPU races the two on a query, in the
    dtype the model runs in: on a bf16 CPU torch bf16 and ONNX fp32 are close, on an AVX2 one
    bf16 is slow. The slower one here is slowed by 30 ms a call, so the race is decided."""
    import logging
    import time

    from searchengine.models import onnx_text
    from searchengine.app import wiring
    from searchengine.models.retrieval import RetrievalModel

    monkeypatch.setenv("SEARCHENGINE_CACHE_DIR", str(tmp_path / "cache"))
    if slower == "onnx":
        call = OnnxTextEncoder.__call__
        monkeypatch.setattr(OnnxTextEncoder, "__call__", lambda self, *a: (time.sleep(0.03), call(self, *a))[1])
    else:
        features = RetrievalModel.text_features
        monkeypatch.setattr(RetrievalModel, "text_features", lambda self, *a: (time.sleep(0.03), features(self, *a))[1])
    with caplog.at_level(logging.INFO, logger="searchengine.app.wiring"):
        loaded = wiring.load_model(settings.model_copy(update={"dtype": dtype}), settings.model, serving=True)
    assert loaded.vision_dtype == getattr(torch, dtype)
    assert (loaded.onnx_text is None) == (slower == "onnx")
    assert f"against torch ({dtype})" in caplog.text and "ITC cosine" in caplog.text
    result = onnx_text.race(loaded, loaded.onnx_text or OnnxTextEncoder(loaded))
    assert result.cosine >= onnx_text.RACE_MIN_COSINE  # the same vectors, in bf16 too


def test_auto_keeps_torch_where_the_vectors_differ(settings, tmp_path, monkeypatch):
    from searchengine.app import wiring

    monkeypatch.setenv("SEARCHENGINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(OnnxTextEncoder, "__call__", lambda self, ids, mask: np.ones((len(ids), 16), np.float32) / 4)
    assert wiring.load_model(settings, settings.model, serving=True).onnx_text is None


def test_auto_chooses_onnx_where_it_wins_and_torch_elsewhere(monkeypatch):
    import importlib.util

    from searchengine.app.wiring import text_backend

    assert text_backend("auto", "cpu", serving=True) == "onnx"
    assert text_backend("auto", "cpu", serving=False) == "torch"  # one query: loading it costs more than it saves
    assert text_backend("auto", "cuda:0", serving=True) == "torch"
    assert text_backend("onnx", "mps", serving=True) == "torch"
    assert text_backend("onnx", "cpu", serving=False) == "onnx" and text_backend("torch", "cpu", serving=True) == "torch"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert text_backend("auto", "cpu", serving=True) == "torch"  # not installed: torch, quietly


def test_auto_falls_back_to_torch_when_the_export_fails(settings, monkeypatch, caplog):
    from searchengine.models import onnx_text
    from searchengine.app import wiring

    def broken(model, path):
        raise ModelLoadError("cannot export the text encoder to ONNX (RuntimeError: boom); use text_backend torch")

    monkeypatch.setattr(onnx_text.OnnxTextEncoder, "_export", staticmethod(broken))
    monkeypatch.setenv("SEARCHENGINE_CACHE_DIR", str(settings.data_dir) + "-cache")
    with caplog.at_level("WARNING"):
        loaded = wiring.load_model(settings, settings.model, serving=True)
    assert loaded.onnx_text is None and "queries are encoded with torch" in caplog.text
    with pytest.raises(ModelLoadError, match="boom"):  # asked for by name: refused, not swapped
        wiring.load_model(settings.model_copy(update={"text_backend": "onnx"}), settings.model)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_search_takes_text_backend_onnx_from_the_command_line(tmp_path, tiny_model_dir, model, monkeypatch, dtype):
    """`searchengine search --text-backend onnx` ranks as torch does in float32, whatever the
    dtype the model runs in: the encoder is exported from the stored float32 weights (under
    bf16 the export failed: ScalarType ComplexDouble)."""
    import json

    from PIL import Image

    from tests.inprocess import run_cli

    monkeypatch.setenv("SEARCHENGINE_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "pics"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    env = {"SEARCHENGINE_DATA_DIR": str(tmp_path / "data"), "SEARCHENGINE_CACHE_DIR": str(tmp_path / "cache")}
    assert run_cli("index", folder, "--model", tiny_model_dir, "--no-captions", env=env).returncode == 0
    ranked = {}
    for backend, runs_in in (("torch", "float32"), ("onnx", dtype)):
        r = run_cli("search", "a", "photo", "--mode", "semantic", "--no-rerank", "--json", "--text-backend", backend,
                    "--dtype", runs_in, env=env)
        assert r.returncode == 0, r.stderr
        ranked[backend] = [(x["id"], round(x["itc"], 4)) for x in json.loads(r.stdout)["results"]]
    assert ranked["onnx"] == ranked["torch"] and (tmp_path / "cache" / "onnx").is_dir()


def test_the_export_cache_lives_where_the_environment_says(monkeypatch, tmp_path):
    from searchengine.models.onnx_text import cache_dir

    monkeypatch.delenv("SEARCHENGINE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "searchengine" / "onnx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "searchengine" / "onnx"
    monkeypatch.setenv("SEARCHENGINE_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine" / "onnx"
