"""The ViT feature cache in 8 bits (`itm_features=cache-int8`): per-token scales, half the
disk of fp16, and the ITM difference it makes against fp16, on the trained colour model."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.pipeline import Indexer
from searchengine.feature_cache import FeatureCache, dequantize, quantize
from searchengine.library import Library
from searchengine.models import RetrievalModel
from searchengine.queries import Searcher
from searchengine.settings import Settings
from tests.trained import COLOURS, colour_picture


def test_int8_codes_round_trip_within_half_a_step_per_token(tmp_path):
    rng = np.random.default_rng(0)
    vit = (rng.standard_normal((17, 48)) * rng.uniform(0.01, 30, (17, 1))).astype(np.float32)  # tokens of any scale
    vit[3] = 0.0  # a token of zeros stays zeros
    packed = quantize(vit)
    assert packed.dtype == np.int8 and packed.shape == (17, 52)
    back = dequantize(packed)
    step = np.abs(vit).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(back - vit) <= step / 2 + 1e-6) and np.all(back[3] == 0)
    fp16, int8 = FeatureCache(tmp_path / "a", (17, 48)), FeatureCache(tmp_path / "b", (17, 48), int8=True)
    fp16.put(1, vit)
    int8.put(1, vit)
    np.testing.assert_allclose(int8.get(1), back)
    # either cache reads the other's entries (a change of setting leaves a usable cache)
    np.testing.assert_array_equal(int8.get.__func__(fp16, 1), fp16.get(1))
    np.testing.assert_allclose(fp16.get.__func__(int8, 1), back)
    assert FeatureCache(tmp_path / "b", (17, 47)).get(1) is None  # another shape: not this model's
    # blip2-itm-vit-g's ViT output: 257 tokens of 1408
    real = rng.standard_normal((257, 1408)).astype(np.float32)
    fp16, int8 = FeatureCache(tmp_path / "c", real.shape), FeatureCache(tmp_path / "d", real.shape, int8=True)
    fp16.put(7, real)
    int8.put(7, real)
    ratio = int8.path(7).stat().st_size / fp16.path(7).stat().st_size
    assert ratio < 0.502, ratio  # half the disk, plus a scale per token


@pytest.fixture(scope="module")
def caches(tmp_path_factory, colour_model_dir):
    """The same 24 colour pictures indexed three times: fp16 cache, int8 cache, no cache."""
    root = tmp_path_factory.mktemp("int8")
    folder = root / "pics"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for n in range(24):
        colour_picture(list(COLOURS)[n % 4], rng, size=64).save(folder / f"p{n:02d}.png")
    model = RetrievalModel.load(str(colour_model_dir), device="cpu", dtype="float32")
    out = {}
    for mode in ("cache", "cache-int8", "recompute"):
        settings = Settings(data_dir=root / mode, model=str(colour_model_dir), device="cpu", dtype="float32",
                            batch_size=8, itm_features=mode)
        library = Library.open(settings, create=True)
        Indexer(model, library, settings).run([folder])
        out[mode] = (Searcher(model, library, settings), settings)
    yield out
    for searcher, _ in out.values():
        searcher.library.close()


def test_int8_cache_halves_the_disk_and_moves_itm_by_little(caches):
    sizes = {m: sum(p.stat().st_size for p in s.features_dir.rglob("*.npy")) for m, (_, s) in caches.items()}
    assert sizes["recompute"] == 0 and sizes["cache-int8"] < sizes["cache"]  # tiny tokens: the headers weigh
    worst_fp16 = worst_int8 = 0.0
    for query in ("red", "a blue dog", "green", "yellow bird"):
        by_mode = {}
        for mode, (searcher, _) in caches.items():
            hits = searcher.search(query, k=24, mode="semantic").hits
            by_mode[mode] = {h.path.rsplit("/", 1)[1]: h.itm for h in hits if h.itm is not None}
        exact = by_mode["recompute"]
        assert by_mode["cache"].keys() == by_mode["cache-int8"].keys() == exact.keys()
        worst_fp16 = max(worst_fp16, max(abs(by_mode["cache"][k] - exact[k]) for k in exact))
        worst_int8 = max(worst_int8, max(abs(by_mode["cache-int8"][k] - by_mode["cache"][k]) for k in exact))
    print(f"ITM |dp|: fp16 cache vs recompute {worst_fp16:.2e}; int8 cache vs fp16 cache {worst_int8:.2e}")
    assert worst_fp16 <= 1e-3
    assert worst_int8 <= 1e-3  # measured 1.2e-4
