"""The captioner: images -> one line of text each, made at index time and stored with the image.

Two families, both loaded by hub id or local directory through `from_pretrained`:
- BLIP (`BlipForConditionalGeneration`, `Salesforce/blip-image-captioning-base`): the CPU default;
- BLIP-2 with a language model (`Blip2ForConditionalGeneration`,
  `Salesforce/blip2-opt-2.7b-coco`): the GPU default.

Captions come from the model's own `generate` on pixel values made by the checkpoint's own
image processor, decoded by its own tokenizer, so they are exactly what the model card's
example prints for the same image and generation settings (tests/searchengine/test_captions.py
checks this). A batch that fails is retried one image at a time, so one bad image costs its
own caption only; its reason is recorded and its embedding is kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from searchengine.config.devices import CPU_CAPTIONER, GPU_CAPTIONER, defaults_for
from searchengine.errors import ModelLoadError
from searchengine.media.preprocess import Preprocessor
from searchengine.models.loading import first_line, int8_loading, load_config, load_pretrained, resolve_device, resolve_dtype

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

CPU_DEFAULT, GPU_DEFAULT = CPU_CAPTIONER, GPU_CAPTIONER

# model_type -> (the class that writes captions, the weights it needs beyond the vision side)
_FAMILIES = {
    "blip": ("BlipForConditionalGeneration", "text_decoder"),
    "blip-2": ("Blip2ForConditionalGeneration", "language_model"),
}


def default_caption_model(device: str) -> str:
    return defaults_for(device).caption_model


@dataclass
class Caption:
    """One image's caption, or why it has none."""

    text: str | None
    error: str | None = None


class Captioner:
    def __init__(self, name: str, model, processor, *, device: str, max_new_tokens: int = 30, num_beams: int = 1):
        self.name = name
        self.model = model.eval()
        self.processor = processor
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.dtype = next(model.parameters()).dtype

    @classmethod
    def load(
        cls, name: str, *, device: str = "auto", dtype: str = "auto", max_new_tokens: int = 30, num_beams: int = 1
    ) -> "Captioner":
        import transformers

        where, config = load_config(name, "caption model")
        family = _FAMILIES.get(getattr(config, "model_type", None))
        architectures = getattr(config, "architectures", None) or []
        if family is None or (architectures and family[0] not in architectures):
            what = architectures[0] if architectures else getattr(config, "model_type", "unknown")
            raise ModelLoadError(
                f"caption model {name!r} is a {what!r}, not a captioning model; use a BLIP or BLIP-2 captioner "
                f"such as {CPU_DEFAULT} or {GPU_DEFAULT}"
            )
        class_name, decoder = family
        device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, device)
        eight_bit = int8_loading(device) if dtype == "int8" else {}
        model, processor, missing = load_pretrained(
            getattr(transformers, class_name), where, name, "caption model", dtype=torch_dtype, **eight_bit,
        )
        if any(k.startswith(decoder) for k in missing):
            raise ModelLoadError(f"caption model {name!r} has no trained {decoder} weights; it cannot write captions")
        if not eight_bit:  # an 8-bit model is placed by its device_map and cannot be moved
            model.to(device)
        log.info("loaded caption model %s on %s in %s", name, device, "int8" if eight_bit else torch_dtype)
        return cls(name, model, processor, device=device, max_new_tokens=max_new_tokens, num_beams=num_beams)

    def preprocess(self, images: Sequence["Image.Image"]) -> "torch.Tensor":
        """RGB PIL images -> pixel values, by the checkpoint's own image processor."""
        return self.preprocessor(images)

    @property
    def preprocessor(self) -> Preprocessor:
        return Preprocessor(self.processor.image_processor)

    def bytes_per_image(self) -> int:
        """Estimated device memory one image takes while it is captioned: its vision encoder's
        activations, plus the language model's key/value cache over the image's tokens and
        the caption (per beam)."""
        from searchengine.config.devices import transformer_bytes_per_image

        cfg = self.model.config
        v, t = cfg.vision_config, cfg.text_config
        element = next(self.model.parameters()).element_size()
        tokens = (v.image_size // v.patch_size) ** 2 + 1
        vision = transformer_bytes_per_image(tokens, v.hidden_size, v.intermediate_size, v.num_attention_heads, element)
        text_tokens = getattr(cfg, "num_query_tokens", 0) + self.max_new_tokens + 16
        kv = 2 * t.num_hidden_layers * t.hidden_size * text_tokens * max(2, element) * self.num_beams
        return vision + kv

    def generate(self, pixel_values: "torch.Tensor") -> list[str]:
        """Captions for a batch of pixel values; raises if the batch fails."""
        import torch

        with torch.inference_mode():
            out = self.model.generate(
                pixel_values=pixel_values.to(self.device, dtype=self.dtype),
                max_new_tokens=self.max_new_tokens,
                num_beams=self.num_beams,
            )
        return [" ".join(t.split()) for t in self.processor.batch_decode(out, skip_special_tokens=True)]

    def caption_pixels(self, pixel_values: "torch.Tensor") -> list[Caption]:
        """One `Caption` per image: a failed batch is retried image by image."""
        try:
            texts = self.generate(pixel_values)
        except Exception as e:  # noqa: BLE001 - isolate the image that breaks it
            if len(pixel_values) == 1:
                log.warning("captioning failed: %s", e)
                return [Caption(None, f"{type(e).__name__}: {first_line(e)}")]
            log.info("a caption batch failed (%s); captioning its images one at a time", e)
            return [c for i in range(len(pixel_values)) for c in self.caption_pixels(pixel_values[i : i + 1])]
        return [Caption(t) if t else Caption(None, "the caption model wrote nothing for this image") for t in texts]

    def caption(self, images: Sequence["Image.Image"]) -> list[Caption]:
        return self.caption_pixels(self.preprocess(images))
