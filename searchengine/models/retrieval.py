"""The BLIP-2 retrieval model: images -> ITC vectors (+ ViT output), texts -> ITC vector, ITM.

Every score is computed by calling the submodules of transformers'
`Blip2ForImageTextRetrieval` in exactly the order its own `forward` does, so that the numbers
equal the reference (tests/models/test_models.py checks this). We call the submodules
instead of `forward` because `forward` always re-runs the ViT from pixels, while re-ranking
wants to start from stored ViT outputs, and indexing wants the ITC vectors and the ViT output
from one pass.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from searchengine.config.devices import batch_for_memory, defaults_for, is_cuda, transformer_bytes_per_image
from searchengine.errors import ModelLoadError
from searchengine.media.preprocess import Preprocessor
from searchengine.models.hub import looks_local
from searchengine.models.loading import int8_loading, load_config, load_pretrained, resolve_device, resolve_dtype

if TYPE_CHECKING:  # torch and transformers are imported when a model is loaded, not before
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

# [N, Q, D] float32, each row L2-normalised (Q = query tokens, 32 for the real checkpoint).
ImageVectors = np.ndarray
# [T, D] float32, L2-normalised.
TextVectors = np.ndarray

_RETRIEVAL_KEYS = ("itm_head", "text_projection", "vision_projection", "query_tokens")


@dataclass
class ImageEmbeddings:
    itc: ImageVectors
    vit: "torch.Tensor"  # ViT last_hidden_state [N, patches + 1, width], in the model's dtype


def fingerprint(config, query_tokens: np.ndarray) -> str:
    """Identifies the weights, not the path: the same checkpoint moved elsewhere matches.

    `query_tokens` are the checkpoint's as stored, widened to float32 (exact from any stored
    dtype), never the tensor of a loaded model: transformers casts it to the dtype the model
    is loaded in, so a fingerprint of the loaded tensor changed with --dtype and the device
    (`stored_query_tokens` reads it from the files).
    """
    v = config.vision_config
    vit_shape = ((v.image_size // v.patch_size) ** 2 + 1, v.hidden_size)
    h = hashlib.sha256()
    h.update(f"{config.num_query_tokens}/{config.image_text_hidden_size}/{v.image_size}/{vit_shape}".encode())
    h.update(np.ascontiguousarray(query_tokens, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def former_fingerprints(config, query_tokens: np.ndarray) -> set[str]:
    """The fingerprints that versions before the stored-weights rule recorded for the same
    checkpoint when it was loaded in bfloat16 or float16 (the loaded tensor, rounded to that
    dtype, was hashed): an index they built is the same model, and is told so."""
    import torch

    stored = torch.from_numpy(np.ascontiguousarray(query_tokens, dtype=np.float32))
    return {fingerprint(config, stored.to(dt).float().numpy()) for dt in (torch.bfloat16, torch.float16)}


def _checkpoint_files(name: str) -> dict[str, str | None]:
    """The paths of a checkpoint's config and weight files, on disk or in the hub cache (never
    downloaded); None for each one that is not at hand."""
    names = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    files: dict[str, str | None] = {}
    if looks_local(name):
        directory = os.path.expanduser(name)
        for filename in names:
            path = os.path.join(directory, filename)
            files[filename] = path if os.path.isfile(path) else None
        return files
    from huggingface_hub import try_to_load_from_cache

    for filename in names:
        got = try_to_load_from_cache(name, filename)
        files[filename] = got if isinstance(got, str) else None
    return files


def _weights_holding(files: dict[str, str | None], key: str) -> str | None:
    """The weight file (a shard of a sharded checkpoint) that holds tensor `key`."""
    import json

    for single, index in (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if files[single] is not None:
            return files[single]
        if files[index] is not None:
            with open(files[index], encoding="utf-8") as f:
                shard = json.load(f).get("weight_map", {}).get(key)
            if shard is not None:
                path = os.path.join(os.path.dirname(files[index]), shard)
                return path if os.path.isfile(path) else None
    return None


def stored_query_tokens(name: str, files: dict[str, str | None] | None = None) -> np.ndarray | None:
    """The checkpoint's `query_tokens` as stored in its files, as float32 (exact); None where
    the files are not at hand or hold no such tensor. `files`: `_checkpoint_files(name)`, if
    the caller has looked them up already."""
    files = _checkpoint_files(name) if files is None else files
    weights = _weights_holding(files, "query_tokens")
    if weights is None:
        return None
    import torch

    try:
        if weights.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(weights, framework="pt") as f:
                if "query_tokens" not in f.keys():
                    return None
                return f.get_tensor("query_tokens").float().numpy()
        state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
        tokens = state.get("query_tokens")
        return None if tokens is None else tokens.float().numpy()
    except Exception:  # noqa: BLE001 - unreadable here: the caller says what it falls back to
        log.debug("cannot read query_tokens from %s", weights, exc_info=True)
        return None


def peek_fingerprints(name: str) -> set[str]:
    """The fingerprint of a checkpoint read from its files (config + query tokens), without
    loading the model, with those earlier versions took of it in bf16 or fp16; empty where
    that cannot be done (not on disk, no query tokens)."""
    files = _checkpoint_files(name)
    if files["config.json"] is None:
        return set()
    tokens = stored_query_tokens(name, files)
    if tokens is None:
        return set()
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(os.path.dirname(files["config.json"]), local_files_only=True)
    except Exception:  # noqa: BLE001 - "cannot tell cheaply", the caller loads and checks
        return set()
    return {fingerprint(config, tokens), *former_fingerprints(config, tokens)}


class RetrievalModel:
    """A loaded `Blip2ForImageTextRetrieval` with its image processor and tokenizer."""

    def __init__(
        self, name: str, model, image_processor, tokenizer, *, device: str, text_max_tokens: int = 35, processor=None,
    ):
        import torch

        self.name = name
        self.processor = processor  # the checkpoint's processor, as loaded (what `save_pretrained` writes)
        self.model = model.eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.device = device
        self.text_max_tokens = text_max_tokens
        cfg = model.config
        self.num_query_tokens: int = cfg.num_query_tokens
        self.embed_dim: int = cfg.image_text_hidden_size
        self.image_size: int = cfg.vision_config.image_size
        patches = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        self.vit_shape: tuple[int, int] = (patches + 1, cfg.vision_config.hidden_size)
        self.vision_dtype: torch.dtype = model.vision_model.embeddings.patch_embedding.weight.dtype
        stored = self._stored_tokens()  # read once: every bind asks for both
        self.fingerprint: str = fingerprint(cfg, stored)
        # What versions before the stored-weights rule recorded for this checkpoint in bf16/fp16.
        self.former_fingerprints: set[str] = former_fingerprints(cfg, stored)
        self.onnx_text: Callable | None = None  # what encodes queries instead of torch (`load`'s text_encoder)

    @classmethod
    def load(
        cls, name: str, *, device: str = "auto", dtype: str = "auto", text_max_tokens: int = 35,
        text_encoder: "Callable[[RetrievalModel], Callable | None] | None" = None,
    ) -> "RetrievalModel":
        """Load by hub id or local directory, both through `from_pretrained`. `text_encoder`:
        given the loaded model, what encodes its queries instead of torch (an OnnxTextEncoder,
        see searchengine/models/onnx_text.py), or None for torch; decided here, once."""
        from transformers import Blip2ForImageTextRetrieval

        where, config = load_config(name)
        if getattr(config, "model_type", None) != "blip-2":
            raise ModelLoadError(
                f"model {name!r} is a {getattr(config, 'model_type', 'unknown')!r} model, not BLIP-2; "
                "use a BLIP-2 retrieval checkpoint such as Salesforce/blip2-itm-vit-g"
            )
        device = resolve_device(device)
        if dtype == "int8":
            int8_loading(device)  # refused on a CPU before anything loads
        torch_dtype = resolve_dtype(dtype, device)
        model, processor, missing_keys = load_pretrained(
            Blip2ForImageTextRetrieval, where, name, "model", dtype=torch_dtype,
            attn_implementation="sdpa",  # PyTorch's fused attention: flash / memory-efficient on a GPU
        )
        missing = sorted(k for k in missing_keys if k.split(".")[0] in _RETRIEVAL_KEYS)
        if missing:
            raise ModelLoadError(
                f"model {name!r} is BLIP-2 but has no image-text retrieval weights (missing {missing[0]}, ...); "
                "use a retrieval checkpoint such as Salesforce/blip2-itm-vit-g"
            )
        model.to(device)
        image_processor = getattr(processor, "image_processor", None)
        tokenizer = getattr(processor, "tokenizer", None)
        if image_processor is None or tokenizer is None:
            raise ModelLoadError(f"model {name!r} has no image processor and tokenizer saved with it")
        log.info("loaded %s on %s in %s", name, device, torch_dtype)
        loaded = cls(name, model, image_processor, tokenizer, device=device, text_max_tokens=text_max_tokens, processor=processor)
        loaded.onnx_text = text_encoder(loaded) if text_encoder is not None else None
        return loaded

    # -- images ---------------------------------------------------------------------------

    def preprocess(self, images: Sequence["Image.Image"]) -> "torch.Tensor":
        """RGB PIL images -> pixel values [N, 3, S, S], exactly as the checkpoint's processor.

        The size is the ViT's own input size (its position embeddings fix it); the saved
        processor config of some checkpoints names another.
        """
        return self.preprocessor(images)

    @property
    def preprocessor(self) -> Preprocessor:
        return Preprocessor(self.image_processor, self.image_size)

    def embed_pixels(self, pixel_values: "torch.Tensor") -> ImageEmbeddings:
        """Pixel values -> ITC vectors [N, Q, D] and the ViT output, in one pass."""
        import torch

        vit = self.vit(pixel_values)
        with torch.inference_mode():
            itc = self.itc_from_vit(vit)
        return ImageEmbeddings(itc=itc, vit=vit)

    def bytes_per_image(self) -> int:
        """Estimated device memory one image takes while it is embedded (ViT activations)."""
        v = self.model.config.vision_config
        element = self.model.vision_model.embeddings.patch_embedding.weight.element_size()
        return transformer_bytes_per_image(self.vit_shape[0], v.hidden_size, v.intermediate_size, v.num_attention_heads, element)

    def index_batch(self, captioner_bytes: int = 0) -> int:
        """Images per indexing batch: the device default on a CPU; on a CUDA GPU as many as its
        free memory holds, with the captioner's share (`captioner_bytes` a image) counted."""
        default = defaults_for(self.device).index_batch
        if not is_cuda(self.device):
            return default
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(self.device))
        return batch_for_memory(free, self.bytes_per_image() + captioner_bytes, least=default)

    def vit(self, pixel_values: "torch.Tensor") -> "torch.Tensor":
        """The ViT output alone (what ITM needs), for candidates with no cached features."""
        import torch

        with torch.inference_mode():
            pv = pixel_values.to(self.device, dtype=self.vision_dtype)
            return self.model.vision_model(pixel_values=pv).last_hidden_state

    def embed_images(self, images: Sequence["Image.Image"]) -> ImageEmbeddings:
        return self.embed_pixels(self.preprocess(images))

    def itc_from_vit(self, vit: "torch.Tensor") -> ImageVectors:
        return self.image_features(vit).float().cpu().numpy()

    # The three computations below are the model, as tensors (gradients flow where the caller
    # allows them): inference wraps them in inference_mode, fine-tuning trains through them.

    def image_features(self, vit: "torch.Tensor") -> "torch.Tensor":
        """ViT outputs [N, P, W] -> ITC vectors [N, Q, D], L2-normalised."""
        import torch
        from torch.nn import functional as F

        m = self.model
        vit_mask = torch.ones(vit.shape[:-1], dtype=torch.long, device=vit.device)
        queries = m.query_tokens.expand(vit.shape[0], -1, -1)
        out = m.qformer(query_embeds=queries, encoder_hidden_states=vit, encoder_attention_mask=vit_mask)
        hidden = out.last_hidden_state.to(dtype=m.vision_projection.weight.dtype)
        return F.normalize(m.vision_projection(hidden), dim=-1)

    def text_features(self, input_ids: "torch.Tensor", attention_mask: "torch.Tensor") -> "torch.Tensor":
        """Tokenized texts -> ITC vectors [T, D]: the Q-Former text side, position 0, projected."""
        return text_itc(self.model, input_ids, attention_mask)

    def itm_logits(self, input_ids: "torch.Tensor", attention_mask: "torch.Tensor", vit: "torch.Tensor") -> "torch.Tensor":
        """ITM logits [N, 2] (column 1: match) of text i with image i, ViT outputs [N, P, W]."""
        import torch

        m = self.model
        n = vit.shape[0]
        queries = m.query_tokens.expand(n, -1, -1)
        query_mask = torch.ones(queries.shape[:-1], dtype=torch.long, device=vit.device)
        emb = m.embeddings(input_ids=input_ids, query_embeds=queries)
        # The reference passes an all-ones ViT mask, which transformers drops before attention
        # (attending to every patch); passing none is the same computation, and the only one
        # that traces: a traced all-ones mask keeps the query+text length (48 rows) while the
        # cross-attention sees the queries alone (32), so the ONNX export failed on it.
        out = m.qformer(
            query_embeds=emb,
            query_length=queries.shape[1],
            attention_mask=torch.cat([query_mask, attention_mask], dim=1),
            encoder_hidden_states=vit,
        ).last_hidden_state
        out = out.to(dtype=m.itm_head.weight.dtype)
        return m.itm_head(out[:, : queries.shape[1], :]).mean(dim=1)

    # -- text -----------------------------------------------------------------------------

    def explain(self, text: str, vit: "torch.Tensor"):
        """Where `text` matches one image, from its ViT output: a HeatMap (models/explain.py)."""
        from searchengine.models.explain import grad_cam

        return grad_cam(self, text, vit)

    def tokenize(self, texts: Sequence[str]) -> dict:
        # The tokenizer directly, never the processor: Blip2Processor with num_query_tokens
        # prepends <image> tokens, and with max_length it fails (MODEL_NOTES.md).
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.text_max_tokens, return_tensors="pt"
        )

    def embed_texts(self, texts: Sequence[str]) -> TextVectors:
        """Texts -> ITC vectors [T, D]: the Q-Former text side, position 0, text projection."""
        import torch

        tok = self.tokenize(texts)
        if self.onnx_text is not None:  # text_backend onnx (see searchengine/models/onnx_text.py)
            return self.onnx_text(tok["input_ids"].numpy(), tok["attention_mask"].numpy())
        with torch.inference_mode():
            feats = self.text_features(tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device))
            return feats.float().cpu().numpy()

    # -- image-text matching --------------------------------------------------------------

    def itm(self, text: str, vit: "torch.Tensor", batch_size: int = 32) -> np.ndarray:
        """P(match) of `text` with each of N images given their ViT outputs [N, P, W] -> [N]."""
        return self._itm(self.tokenize([text]), vit, batch_size)

    def itm_pairs(self, texts: Sequence[str], vit: "torch.Tensor", batch_size: int = 32) -> np.ndarray:
        """P(match) of texts[i] with image i, given the images' ViT outputs [N, P, W] -> [N]
        (padded to the longest text; the attention mask leaves the padding out)."""
        if len(texts) != vit.shape[0]:
            raise ValueError(f"{len(texts)} texts for {vit.shape[0]} images: ITM scores pairs")
        return self._itm(self.tokenize(texts), vit, batch_size) if len(texts) else np.zeros(0, np.float32)

    def _itm(self, tok: dict, vit: "torch.Tensor", batch_size: int) -> np.ndarray:
        """ITM of tokenized texts (one for all images, or one per image) with ViT outputs."""
        import torch

        one = tok["input_ids"].shape[0] == 1
        probs = []
        with torch.inference_mode():
            for start in range(0, vit.shape[0], batch_size):
                chunk = vit[start : start + batch_size].to(self.device, dtype=self.vision_dtype)
                n = chunk.shape[0]
                rows = slice(0, 1) if one else slice(start, start + n)
                ids = tok["input_ids"][rows].to(self.device).expand(n, -1)
                text_mask = tok["attention_mask"][rows].to(self.device).expand(n, -1)
                logits = self.itm_logits(ids, text_mask, chunk)
                probs.append(torch.softmax(logits.float(), dim=-1)[:, 1].cpu())
        return torch.cat(probs).numpy() if probs else np.zeros(0, dtype=np.float32)

    # -- identity -------------------------------------------------------------------------

    @property
    def made_by(self) -> str:
        """How this model runs, as an index records what made its vectors: "bfloat16 on cuda"."""
        return f"{str(self.vision_dtype).replace('torch.', '')} on {self.device.split(':')[0]}"

    def _stored_tokens(self) -> np.ndarray:
        """The query tokens as the checkpoint stores them (what identifies it). From the
        files; a model not loaded from files (built in memory) or in a format they cannot be
        read from has them exactly only in float32, which is then what it runs in."""
        stored = stored_query_tokens(self.name)
        if stored is not None and stored.shape == tuple(self.model.query_tokens.shape):
            return stored
        import torch

        loaded = self.model.query_tokens.detach()
        if loaded.dtype != torch.float32:
            log.warning("the query tokens of %s cannot be read from its files: its fingerprint is taken from "
                        "the weights as loaded in %s, and differs from a float32 load's", self.name, loaded.dtype)
        return loaded.float().cpu().numpy()


def text_itc(m, input_ids: "torch.Tensor", attention_mask: "torch.Tensor") -> "torch.Tensor":
    """The text side of ITC on any module with BLIP-2's `embeddings`, `qformer` and
    `text_projection` (the retrieval model, or `Blip2TextModelWithProjection` loaded from the
    same checkpoint): tokenized texts -> ITC vectors [T, D], L2-normalised."""
    from torch.nn import functional as F

    emb = m.embeddings(input_ids=input_ids)
    out = m.qformer(query_embeds=emb, query_length=0, attention_mask=attention_mask).last_hidden_state
    cls = out[:, 0, :].to(dtype=m.text_projection.weight.dtype)
    return F.normalize(m.text_projection(cls), dim=-1)


