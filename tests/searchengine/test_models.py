"""Parity with the reference: transformers' own Blip2ForImageTextRetrieval.forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers import AutoProcessor, Blip2ForImageTextRetrieval

from searchengine.errors import ModelLoadError
from searchengine.imageio import decode_image
from searchengine.models import RetrievalModel, resolve_dtype

TEXTS = ["a dog on the beach", "yellow flower in a green meadow", "two elephants"]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    model = Blip2ForImageTextRetrieval.from_pretrained(tiny_model_dir).eval()
    return model, AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture
def files(photo_files):
    return photo_files[::5][:5]  # JPEGs and PNGs of several sizes


def _reference_scores(reference, files, text, itm: bool) -> np.ndarray:
    ref, processor = reference
    # What a transformers user does: open, apply EXIF orientation, hand it to the processor
    # (which composites transparency on white itself).
    images = [ImageOps.exif_transpose(Image.open(f)) for f in files]
    inputs = processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = ref(**inputs, use_image_text_matching_head=itm)
    if itm:
        return torch.softmax(out.logits_per_image, dim=1)[:, 1].numpy()
    return out.logits_per_image[:, 0].numpy()  # each image against the (identical) texts


def _ours(model, files):
    images = [decode_image(f.read_bytes(), max_pixels=10**9).image for f in files]
    return model.embed_images(images)


@pytest.mark.parametrize("text", TEXTS)
def test_itc_equals_reference(model, reference, files, text):
    emb = _ours(model, files)
    ours = (emb.itc @ model.embed_texts([text])[0]).max(axis=1)
    expected = _reference_scores(reference, files, text, itm=False)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)
    assert np.ptp(expected) > 0.05  # the images really score differently: the check has teeth


@pytest.mark.parametrize("text", TEXTS)
def test_itm_equals_reference(model, reference, files, text):
    emb = _ours(model, files)
    ours = model.itm(text, emb.vit)
    expected = _reference_scores(reference, files, text, itm=True)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)
    assert np.ptp(expected) > 0.02


def test_vectors_are_unit_length_and_shaped(model, files):
    emb = _ours(model, files)
    assert emb.itc.shape == (len(files), model.num_query_tokens, model.embed_dim)
    assert emb.itc.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb.itc, axis=-1), 1.0, atol=1e-5)
    assert tuple(emb.vit.shape[1:]) == model.vit_shape
    t = model.embed_texts(TEXTS)
    assert t.shape == (3, model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(t, axis=-1), 1.0, atol=1e-5)


def test_batched_texts_equal_single_texts(model):
    # Padding in a batch must be masked out: each text embeds as it would alone.
    together = model.embed_texts(TEXTS)
    alone = np.stack([model.embed_texts([t])[0] for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_tokenizer_matches_the_processor_and_truncates_at_35(model, reference):
    _, processor = reference
    text = "a dog on the beach"
    assert model.tokenize([text])["input_ids"].tolist() == processor(text=[text])["input_ids"]
    long = " ".join(["dog"] * 100)
    assert model.tokenize([long])["input_ids"].shape[1] == 35


def test_preprocessing_equals_the_processor(model, reference, files):
    _, processor = reference
    images = [Image.open(f).convert("RGB") for f in files[2:4]]
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(model.preprocess(images), expected)


def test_fingerprint_identifies_weights_not_path(tiny_model_dir, tmp_path, model):
    import shutil

    moved = shutil.copytree(tiny_model_dir, tmp_path / "elsewhere")
    assert RetrievalModel.load(str(moved), device="cpu").fingerprint == model.fingerprint
    from searchengine.random_models import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=1)
    assert RetrievalModel.load(str(other), device="cpu").fingerprint != model.fingerprint


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        RetrievalModel.load(str(tmp_path / "nope"))


def test_non_blip2_model_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not BLIP-2"):
        RetrievalModel.load(str(tmp_path))


def test_blip2_without_retrieval_heads_is_refused(tmp_path, tiny_model_dir):
    from transformers import Blip2Config, Blip2Model

    config = Blip2Config.from_pretrained(tiny_model_dir)
    config.text_config = None
    Blip2Model(Blip2Config(vision_config=config.vision_config.to_dict(), qformer_config=config.qformer_config.to_dict(),
                           num_query_tokens=8)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="retrieval"):
        RetrievalModel.load(str(tmp_path))


def test_auto_dtype(monkeypatch):
    import searchengine.models as models

    monkeypatch.setattr(models, "cpu_supports_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(models, "cpu_supports_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
