"""`--dtype int8`: language models in 8 bits through bitsandbytes on CUDA; refused on a CPU
with the alternatives named, before anything loads. (No GPU here: the CUDA path's arguments
are checked with the device and bitsandbytes stubbed.)"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from PIL import Image

from searchengine.errors import ModelLoadError
from searchengine.models.loading import int8_loading
from tests.inprocess import run_cli


def test_int8_is_refused_on_a_cpu_naming_the_alternatives(tmp_path, tiny_model_dir, tiny_captioner_dir):
    folder = tmp_path / "pics"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "a.png")
    data = tmp_path / "data"
    r = run_cli("index", folder, "--model", tiny_model_dir, "--caption-model", tiny_captioner_dir, "--dtype", "int8",
                "--device", "cpu", env={"SEARCHENGINE_DATA_DIR": str(data)})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "CUDA GPU only" in r.stderr and "float32" in r.stderr and "cache-int8" in r.stderr
    assert "--no-captions" not in r.stderr  # not mistaken for a captioner that cannot load
    assert not (data / "store.db").exists()
    from searchengine.models.captioner import Captioner
    from searchengine.models.tiny import build_tiny_captioner
    from searchengine.models.vqa import Answerer

    blip2 = build_tiny_captioner(tmp_path / "blip2", kind="blip2")
    for load, name in ((Captioner.load, tiny_captioner_dir), (Answerer.load, blip2)):
        with pytest.raises(ModelLoadError, match="CUDA GPU only"):
            load(str(name), device="cpu", dtype="int8")


def test_int8_on_cuda_asks_for_bitsandbytes_then_loads_in_8_bits(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(ModelLoadError, match="pip install"):
        int8_loading("cuda")
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    kwargs = int8_loading("cuda:1")
    assert kwargs["quantization_config"].load_in_8bit is True and kwargs["device_map"] == {"": "cuda:1"}


def test_the_captioner_passes_the_8_bit_arguments_and_is_not_moved(monkeypatch, tiny_captioner_dir):
    import transformers

    from searchengine.models import captioner as captioner_module

    seen = {}
    real = transformers.BlipForConditionalGeneration.from_pretrained

    def from_pretrained(*args, **kwargs):
        seen.update(kwargs)
        model, info = real(*args, **{k: v for k, v in kwargs.items() if k not in ("quantization_config", "device_map")})
        model.to = lambda *a, **k: (_ for _ in ()).throw(AssertionError("an 8-bit model was moved"))
        return model, info

    monkeypatch.setattr(transformers.BlipForConditionalGeneration, "from_pretrained", from_pretrained)
    monkeypatch.setattr(captioner_module, "resolve_device", lambda d: "cuda")
    monkeypatch.setattr(captioner_module, "resolve_dtype", lambda d, dev: __import__("torch").float32)
    monkeypatch.setattr(captioner_module, "int8_loading", lambda dev: {"quantization_config": "8-bit", "device_map": {"": dev}})
    loaded = captioner_module.Captioner.load(str(tiny_captioner_dir), device="cuda", dtype="int8")
    assert seen["quantization_config"] == "8-bit" and seen["device_map"] == {"": "cuda"} and loaded.device == "cuda"
