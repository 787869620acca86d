"""Everything that depends on where the models run, decided in this one place.

A GPU embeds 64 images a batch and re-runs the ViT for ITM in milliseconds, so it keeps no
ViT feature cache, and it captions with BLIP-2 OPT-2.7b; a CPU embeds 8 a batch, keeps an fp16
ViT cache (re-running the ViT there costs seconds per candidate, see
benchmarks/query_latency.py), and captions with BLIP base. The dtype follows the hardware:
bf16 (or fp16) on a GPU, bf16 on a CPU that has it in hardware, else fp32. Torch keeps a
thread per core on a CPU and two on a GPU machine, where the cores decode photos for the GPU;
`torch_threads` overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass

CPU_CAPTIONER = "Salesforce/blip-image-captioning-base"
GPU_CAPTIONER = "Salesforce/blip2-opt-2.7b-coco"


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def on_gpu(device: str) -> bool:
    """A CUDA GPU or an Apple GPU (`mps`)."""
    return is_cuda(device) or device == "mps"


def pick(requested: str, *, cuda: bool, mps: bool) -> str | None:
    """The device `requested` means, given what this machine has: "auto" is a CUDA GPU, else an
    Apple GPU, else the CPU. None when a GPU was asked for that is not there."""
    if requested == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if (is_cuda(requested) and not cuda) or (requested == "mps" and not mps):
        return None
    return requested


@dataclass(frozen=True)
class DeviceDefaults:
    index_batch: int  # images per embedding batch
    caption_batch: int  # images per captioning batch (`searchengine caption`)
    caption_model: str  # the captioner of a new index
    vit_cache: bool  # keep each image's ViT output for ITM re-ranking (itm_features "auto")
    torch_threads: int  # torch's intra-op CPU threads; 0: torch's own default (one per core)


def defaults_for(device: str) -> DeviceDefaults:
    """The defaults for a resolved device ("cpu", "cuda", "cuda:1")."""
    if on_gpu(device):
        # The GPU computes; torch's CPU threads only launch kernels, and the cores are the
        # decode threads' (which feed the GPU).
        return DeviceDefaults(index_batch=64, caption_batch=32, caption_model=GPU_CAPTIONER, vit_cache=False, torch_threads=2)
    return DeviceDefaults(index_batch=8, caption_batch=8, caption_model=CPU_CAPTIONER, vit_cache=True, torch_threads=0)


def auto_dtype(device: str, *, gpu_bf16: bool, cpu_bf16: bool) -> str:
    """The dtype "auto" means on `device`, given what its hardware supports."""
    if on_gpu(device):
        return "bfloat16" if gpu_bf16 else "float16"
    return "bfloat16" if cpu_bf16 else "float32"


def transformer_bytes_per_image(tokens: int, width: int, mlp: int, heads: int, element: int) -> int:
    """Activation bytes one image needs at the peak of a transformer layer at inference: the
    hidden state, Q/K/V and the attention output (4 x width), the MLP's two sides (2 x mlp),
    and the attention matrix should the math kernel be picked over a fused one."""
    return tokens * (4 * width + 2 * mlp) * element + heads * tokens * tokens * element


def batch_for_memory(free_bytes: int, per_image_bytes: int, *, least: int, most: int = 256, share: float = 0.5) -> int:
    """Images per batch on a GPU: as many as fit in `share` of its free memory (weights are
    loaded by then), a power of two, never under `least` (the device default) nor over `most`
    (beyond which a batch no longer feeds the GPU better, only holds more in flight). A guess
    that proves too large is split by the embed stage, not fatal."""
    fits = int(free_bytes * share) // max(1, per_image_bytes)
    size = least
    while size * 2 <= min(fits, most):
        size *= 2
    return size
