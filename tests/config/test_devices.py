"""Which device "auto" means, and what each device changes (decided in devices.py)."""

from __future__ import annotations

import pytest
import torch

from searchengine.config.devices import auto_dtype, defaults_for, pick
from searchengine.errors import ModelLoadError
from searchengine.models.loading import resolve_device, resolve_dtype


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


def test_a_gpu_batch_is_sized_to_the_memory_left():
    from searchengine.config.devices import batch_for_memory, transformer_bytes_per_image

    # blip2-itm-vit-g's ViT in bf16: 257 tokens, width 1408, MLP 6144, 16 heads.
    vit_g = transformer_bytes_per_image(257, 1408, 6144, 16, 2)
    assert 10e6 < vit_g < 13e6
    gib = 1024**3
    assert batch_for_memory(70 * gib, vit_g, least=64) == 256  # an H100 after the weights: capped
    assert batch_for_memory(int(1.5 * gib), vit_g, least=64) == 64  # room for 66: the power of two below
    assert batch_for_memory(3 * gib, vit_g, least=64) == 128
    assert batch_for_memory(100 * 1024**2, vit_g, least=64) == 64  # never under the default
    assert batch_for_memory(70 * gib, vit_g, least=8, most=32) == 32


def test_the_indexer_asks_the_gpu_how_much_memory_is_free(monkeypatch, model, captioner):
    """On a CUDA GPU the automatic batch follows torch.cuda.mem_get_info, with the captioner's
    share counted; on a CPU it is the CPU default (8) and the GPU is not asked."""
    asked = []

    def mem_get_info(device):
        asked.append(str(device))
        return 6 * 1024**3, 80 * 1024**3

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    assert model.index_batch() == 8 and asked == []
    monkeypatch.setattr(model, "device", "cuda:0")
    alone = model.index_batch()
    with_captions = model.index_batch(captioner.bytes_per_image())
    assert asked == ["cuda:0", "cuda:0"]
    assert alone == batch_for_memory_expected(model.bytes_per_image()) and with_captions <= alone
    assert captioner.bytes_per_image() > 0


def batch_for_memory_expected(per_image: int) -> int:
    size = 64
    while size * 2 <= min(3 * 1024**3 // per_image, 256):
        size *= 2
    return size


def test_the_models_attend_through_pytorchs_fused_attention(model, captioner):
    """SDPA (flash / memory-efficient kernels on a GPU), not the eager softmax(QK^T)V, wherever
    transformers has it for the class (BLIP base, the CPU captioner, has only eager)."""
    for config in (model.model.config.vision_config, model.model.config.qformer_config):
        assert config._attn_implementation == "sdpa"
    expected = "sdpa" if type(captioner.model)._supports_sdpa else "eager"
    assert captioner.model.config.vision_config._attn_implementation == expected
