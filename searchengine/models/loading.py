"""Loading a checkpoint: the device and dtype it runs in, its config, and its weights and
processor through one `load_pretrained` (the retrieval model, the captioner and the
question-answering model all load this way)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from searchengine.config.devices import auto_dtype, is_cuda, on_gpu, pick
from searchengine.errors import ModelLoadError
from searchengine.models.hub import ModelSource, locate, prepare_loading

if TYPE_CHECKING:
    import torch


CPU_BF16_ENV = "SEARCHENGINE_CPU_BF16"


INT8_ALTERNATIVES = (
    "on a CPU use --dtype float32 (the default there) or bfloat16 (CPUs with avx512_bf16 or AMX), and "
    "--itm-features cache-int8 for a feature cache half the size"
)


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (bf16 is slower without them),
    so that `dtype auto` picks bfloat16 there, as on a GPU.

    $SEARCHENGINE_CPU_BF16 (1 or 0) overrides what /proc/cpuinfo says: to keep float32 on such
    a CPU, to try bf16 where a container hides the flags, and to run the bf16 path (the one
    every GPU takes) on any CPU, as `.ci/run` does for the dtype-sensitive tests.
    """
    forced = os.environ.get(CPU_BF16_ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_device(device: str) -> str:
    import torch

    mps = getattr(torch.backends, "mps", None)
    picked = pick(device, cuda=torch.cuda.is_available(), mps=bool(mps and mps.is_available()))
    if picked is None:
        what = "Apple GPU (mps)" if device == "mps" else "CUDA GPU"
        raise ModelLoadError(f"device {device!r} was asked for, but this machine has no {what}; use --device cpu")
    return picked


def int8_loading(device: str) -> dict:
    """`from_pretrained` arguments that load a model's weights in 8 bits through bitsandbytes
    (`--dtype int8`: the captioner and the question-answering model, BLIP-2 OPT among them,
    in about half the memory of fp16). CUDA only: ModelLoadError elsewhere, naming what to use."""
    if not is_cuda(device):
        raise ModelLoadError(f"--dtype int8 loads models in 8 bits through bitsandbytes, on a CUDA GPU only; {INT8_ALTERNATIVES}")
    import importlib

    try:
        importlib.import_module("bitsandbytes")  # transformers needs it for load_in_8bit
    except ImportError:
        raise ModelLoadError("--dtype int8 needs bitsandbytes: pip install 'searchengine[gpu]' (or pip install bitsandbytes)") from None
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": {"": device}}


def resolve_dtype(dtype: str, device: str) -> "torch.dtype":
    """The torch dtype of `--dtype` on this device. int8 is the weights of language models
    (`int8_loading`); everything else, the retrieval model whole, runs in the automatic dtype."""
    import torch

    if dtype in ("auto", "int8"):
        gpu_bf16 = is_cuda(device) and torch.cuda.is_bf16_supported()  # Apple GPUs: fp16
        dtype = auto_dtype(device, gpu_bf16=gpu_bf16, cpu_bf16=not on_gpu(device) and cpu_supports_bf16())
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_config(name: str, what: str = "model") -> tuple[ModelSource, object]:
    """(where to load from, config) of a hub id or local directory; ModelLoadError if neither."""
    from transformers import AutoConfig

    where = locate(name, what)  # fast and clear when the hub cannot be reached
    prepare_loading()
    try:
        return where, AutoConfig.from_pretrained(where.source, local_files_only=where.local_files_only)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load {what} {name!r}: {first_line(e)}") from e


def load_pretrained(model_class, where: ModelSource, name: str, what: str, *, dtype, **kwargs) -> tuple[object, object, list[str]]:
    """(model, processor, missing weight names) of a checkpoint, both through `from_pretrained`:
    how the retrieval model, the captioner and the question-answering model load. What
    `from_pretrained` refuses is a ModelLoadError naming the model and the first line of why."""
    from transformers import AutoProcessor

    try:
        model, info = model_class.from_pretrained(
            where.source, dtype=dtype, output_loading_info=True, local_files_only=where.local_files_only, **kwargs,
        )
        processor = AutoProcessor.from_pretrained(where.source, local_files_only=where.local_files_only)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load {what} {name!r}: {first_line(e)}") from e
    return model, processor, list(info.get("missing_keys", ()))


def first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
