"""The query encoder on ONNX Runtime (`text_backend=onnx`, CPU): the same Q-Former text path
as `RetrievalModel.text_features`, exported once per model to an ONNX file and run by ONNX
Runtime, which encodes a query 3.4x faster than PyTorch eager on 2 cores (29.0 against
99.1 ms for 10 tokens on the real-size model, ITC cosine 0.9999999: benchmarks/cpu_backends.py).

The export is cached by the model's fingerprint (`~/.cache/searchengine/onnx`, or under
$XDG_CACHE_HOME or $SEARCHENGINE_CACHE_DIR), written to a temporary name and renamed, so a crash never leaves half a file.
It is made from the checkpoint's float32 weights whatever dtype the model runs in (the tracer
cannot export bf16, and a bf16 copy would only round them), so the file is the same for a
model loaded in any dtype, as the fingerprint is. `race` times it against torch in the
model's own dtype, which is how `text_backend auto` chooses in a server.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from searchengine.errors import ModelLoadError

if TYPE_CHECKING:
    from searchengine.models.retrieval import RetrievalModel

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """$SEARCHENGINE_CACHE_DIR/onnx, else ~/.cache/searchengine/onnx (or under $XDG_CACHE_HOME)."""
    if os.environ.get("SEARCHENGINE_CACHE_DIR"):
        return Path(os.environ["SEARCHENGINE_CACHE_DIR"]) / "onnx"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "searchengine" / "onnx"


def float32_text_side(model: "RetrievalModel"):
    """What the export traces: the model itself where it runs in float32 on the CPU, else the
    text side alone (`Blip2TextModelWithProjection`: embeddings, Q-Former, text projection; no
    ViT) loaded in float32 from the checkpoint's files, so the exported weights are the stored
    ones, not a bf16 or fp16 rounding of them (the tracer cannot export bf16 at all). A model
    whose files cannot be read again is widened from its loaded weights instead."""
    import copy

    import torch

    m = model.model
    if m.text_projection.weight.dtype == torch.float32 and m.text_projection.weight.device.type == "cpu":
        return m
    from transformers import Blip2TextModelWithProjection

    from searchengine.models.hub import locate

    try:
        where = locate(model.name)
        return Blip2TextModelWithProjection.from_pretrained(
            where.source, dtype=torch.float32, local_files_only=where.local_files_only
        ).eval()
    except Exception as e:  # noqa: BLE001 - the loaded weights, widened, still export
        log.warning("cannot load the text side of %s in float32 from its files (%s); exporting its loaded weights, widened", model.name, e)

    class TextSide(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = copy.deepcopy(m.embeddings)
            self.qformer = copy.deepcopy(m.qformer)
            self.text_projection = copy.deepcopy(m.text_projection)

    return TextSide().float().cpu().eval()


class OnnxTextEncoder:
    """Tokenized texts -> ITC vectors [T, D] (L2-normalised), as `text_features` computes them."""

    def __init__(self, model: "RetrievalModel", folder: Path | None = None, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ModelLoadError(
                "text_backend onnx needs ONNX Runtime: pip install onnxruntime onnx (or use text_backend torch)"
            ) from None
        import torch

        path = (folder or cache_dir()) / f"text-{model.fingerprint}.onnx"
        if not path.is_file():
            self._export(model, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path = path

    @staticmethod
    def _export(model: "RetrievalModel", path: Path) -> None:
        import torch

        from searchengine.models.retrieval import text_itc

        text_side = float32_text_side(model)

        class Text(torch.nn.Module):
            def forward(self, input_ids, attention_mask):
                return text_itc(text_side, input_ids, attention_mask)

        path.parent.mkdir(parents=True, exist_ok=True)
        tok = model.tokenize(["a photo of a dog", "two words"])
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".export-", suffix=".onnx")
        os.close(fd)
        grads = [p.requires_grad for p in text_side.parameters()]
        try:
            text_side.requires_grad_(False)  # the exporter takes the weights as constants
            # The exporter's tracer warns about every Python branch of the modelling code; the
            # export is checked against torch (tests/models/test_onnx_text.py), not by eye.
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    Text().eval(), (tok["input_ids"], tok["attention_mask"]), tmp,
                    input_names=["input_ids", "attention_mask"], output_names=["itc"],
                    dynamic_axes={"input_ids": {0: "texts", 1: "tokens"}, "attention_mask": {0: "texts", 1: "tokens"}},
                    opset_version=17, dynamo=False,
                )
            os.replace(tmp, path)
            log.info("exported the text encoder of %s to %s", model.name, path)
        except Exception as e:
            raise ModelLoadError(f"cannot export the text encoder to ONNX ({type(e).__name__}: {e}); use text_backend torch") from e
        finally:
            for p, g in zip(text_side.parameters(), grads):
                p.requires_grad_(g)
            if os.path.exists(tmp):
                os.unlink(tmp)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)})
        return np.asarray(out[0], dtype=np.float32)


# What `race` encodes: a query of a typical length (10 tokens with the real tokenizer).
RACE_QUERY = "a dog running on a beach at sunset"
# ONNX must give the vectors torch does: float32 against torch float32 is 0.9999999; against
# torch bf16 it is bf16's own error (the ONNX side is the closer to float32): 0.998 on the tests'
# tiny model (16-d vectors), about 0.9999 on the real one. A broken export is far below.
RACE_MIN_COSINE = 0.99


@dataclass(frozen=True)
class Race:
    """One query encoded by each backend on this machine, as `text_backend auto` decides."""

    onnx_ms: float  # median
    torch_ms: float
    torch_dtype: str
    cosine: float  # of the two backends' vectors

    @property
    def winner(self) -> str:
        return "onnx" if self.cosine >= RACE_MIN_COSINE and self.onnx_ms < self.torch_ms else "torch"

    def __str__(self) -> str:
        return (f"ONNX Runtime (float32) {self.onnx_ms:.1f} ms against torch ({self.torch_dtype}) {self.torch_ms:.1f} ms "
                f"a query, ITC cosine {self.cosine:.6f}")


def race(model: "RetrievalModel", encoder: OnnxTextEncoder, repeat: int = 7) -> Race:
    """Time a query on ONNX Runtime and on torch in the dtype the model runs in, median of
    `repeat` after a warm-up each. Where torch runs in bf16 on a CPU with avx512_bf16 the two
    are close (11 ms against about 9 on the real model), and on an AVX2-only CPU bf16 is
    several times slower, so the choice is measured on the machine, not assumed."""
    import time

    import torch

    tok = model.tokenize([RACE_QUERY])
    ids, mask = tok["input_ids"], tok["attention_mask"]

    def on_torch() -> np.ndarray:
        with torch.inference_mode():
            return model.text_features(ids.to(model.device), mask.to(model.device)).float().cpu().numpy()

    def on_onnx() -> np.ndarray:
        return encoder(ids.numpy(), mask.numpy())

    def median_ms(fn) -> tuple[float, np.ndarray]:
        out = fn()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
        return float(np.median(times)), out

    onnx_ms, a = median_ms(on_onnx)
    torch_ms, b = median_ms(on_torch)
    cosine = float((a * b).sum(axis=-1).min())
    return Race(onnx_ms, torch_ms, str(model.model.text_projection.weight.dtype).replace("torch.", ""), cosine)
