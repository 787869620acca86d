"""Which device "auto" means, and what each device changes (decided in devices.py)."""

from __future__ import annotations

import pytest
import torch

from searchengine.devices import auto_dtype, defaults_for, pick
from searchengine.errors import ModelLoadError
from searchengine.models import resolve_device, resolve_dtype


@pytest.mark.parametrize(
    "cuda, mps, expected", [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")]
)
def test_auto_picks_a_cuda_gpu_then_an_apple_gpu_then_the_cpu(monkeypatch, cuda, mps, expected):
    assert pick("auto", cuda=cuda, mps=mps) == expected
    # The same through the loader's own check, with the availability stubbed.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device("auto") == expected


def test_a_gpu_that_is_not_there_is_refused_in_words(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for device, what in (("cuda", "CUDA GPU"), ("cuda:1", "CUDA GPU"), ("mps", "Apple GPU")):
        with pytest.raises(ModelLoadError, match=what):
            resolve_device(device)
    assert resolve_device("cpu") == "cpu"


def test_what_each_device_changes():
    cpu, cuda, mps = defaults_for("cpu"), defaults_for("cuda:0"), defaults_for("mps")
    assert (cpu.index_batch, cpu.vit_cache, cpu.torch_threads) == (8, True, 0)
    assert (cuda.index_batch, cuda.vit_cache, cuda.torch_threads) == (64, False, 2)
    assert mps == cuda  # an Apple GPU is a GPU: batches, no ViT cache, few CPU threads
    assert auto_dtype("mps", gpu_bf16=False, cpu_bf16=False) == "float16"
    assert auto_dtype("cuda", gpu_bf16=True, cpu_bf16=False) == "bfloat16"
    assert auto_dtype("cpu", gpu_bf16=True, cpu_bf16=False) == "float32"
    assert resolve_dtype("auto", "mps") == torch.float16
