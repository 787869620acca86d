"""The captioner against the model's own `generate`, on real photos, for both families."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor, BlipForConditionalGeneration, Blip2ForConditionalGeneration

from searchengine.models.captioner import Captioner, default_caption_model
from searchengine.errors import ModelLoadError
from searchengine.media.imageio import decode_image, read_file
from searchengine.models.tiny import build_tiny_captioner, build_tiny_model
from tests.helpers import photos_in

CLASSES = {"blip": BlipForConditionalGeneration, "blip2": Blip2ForConditionalGeneration}


@pytest.fixture(scope="module", params=["blip", "blip2"])
def family(request, tmp_path_factory):
    path = build_tiny_captioner(tmp_path_factory.mktemp(f"cap-{request.param}"), kind=request.param, seed=1)
    return request.param, path


@pytest.fixture(scope="module")
def images(photos_dir):
    # Photos, one with alpha, decoded as the indexer decodes them (EXIF transpose, RGB).
    photo_files = photos_in(photos_dir)
    picked = [f for f in photo_files if f.suffix == ".jpg"][:5] + [f for f in photo_files if f.suffix == ".png"][:1]
    return [decode_image(read_file(str(f)), max_pixels=200_000_000).image for f in picked]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_captions_equal_the_models_own_generate(family, images, num_beams):
    kind, path = family
    ours = Captioner.load(str(path), device="cpu", dtype="float32", max_new_tokens=10, num_beams=num_beams)
    assert ours.model.__class__ is CLASSES[kind]
    # The reference: the model card's recipe, one image at a time, with a separately loaded model.
    model = CLASSES[kind].from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    want = []
    for im in images:
        with torch.no_grad():
            out = model.generate(**processor(images=im, return_tensors="pt"), max_new_tokens=10, num_beams=num_beams)
        want.append(processor.decode(out[0], skip_special_tokens=True).strip())
    got = ours.caption(images)  # one batch
    assert [c.text for c in got] == want
    assert all(c.error is None for c in got)
    assert len(set(want)) > 1, "the tiny captioner should describe different photos differently"


def test_a_failing_image_costs_only_its_own_caption(captioner, images, monkeypatch):
    clean = [c.text for c in captioner.caption(images[:2] + images[3:])]
    real = captioner.generate
    poison = captioner.preprocess([images[2]])[0]

    def generate(pixel_values):
        if any(torch.equal(p, poison) for p in pixel_values):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(pixel_values)

    monkeypatch.setattr(captioner, "generate", generate)
    got = captioner.caption(images)
    assert [c.text is None for c in got] == [i == 2 for i in range(len(images))]
    assert "out of memory" in got[2].error
    assert [c.text for i, c in enumerate(got) if i != 2] == clean


def test_loading_refuses_what_cannot_caption(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Captioner.load(str(tmp_path / "nothing"))
    retrieval = build_tiny_model(tmp_path / "retrieval")
    with pytest.raises(ModelLoadError, match="not a captioning model"):
        Captioner.load(str(retrieval), device="cpu")


def test_default_captioner_follows_the_device():
    assert default_caption_model("cpu") == "Salesforce/blip-image-captioning-base"
    assert default_caption_model("cuda:0") == "Salesforce/blip2-opt-2.7b-coco"


@pytest.mark.dtype
def test_captions_in_bf16_equal_the_models_own_generate_in_bf16(family, images):
    """bf16, as on a GPU or a CPU with avx512_bf16: the captioner casts the pixels to the
    model's dtype as the model card's recipe does with a bf16 model (one image at a time, so
    that no batch shape changes bf16's rounding)."""
    kind, path = family
    ours = Captioner.load(str(path), device="cpu", dtype="bfloat16", max_new_tokens=10)
    assert ours.dtype == torch.bfloat16
    model = CLASSES[kind].from_pretrained(path, dtype=torch.bfloat16).eval()
    processor = AutoProcessor.from_pretrained(path)
    for im in images[:3]:
        inputs = processor(images=im, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(pixel_values=inputs["pixel_values"].to(torch.bfloat16), max_new_tokens=10)
        (got,) = ours.caption([im])
        assert got.error is None and got.text == processor.decode(out[0], skip_special_tokens=True).strip()
