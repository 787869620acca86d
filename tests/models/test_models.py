"""Parity with the reference: transformers' own Blip2ForImageTextRetrieval.forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers import AutoProcessor, Blip2ForImageTextRetrieval

from searchengine.errors import ModelLoadError
from searchengine.media.imageio import decode_image
from searchengine.models.retrieval import RetrievalModel
from searchengine.models.loading import resolve_dtype

pytestmark = pytest.mark.dtype  # dtype auto, and every dtype a model loads in

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
    from searchengine.models.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=1)
    assert RetrievalModel.load(str(other), device="cpu").fingerprint != model.fingerprint


@pytest.mark.parametrize("dtype", ["auto", "float32", "bfloat16", "float16"])
def test_fingerprint_is_the_weights_as_stored_in_every_dtype(tiny_model_dir, model, dtype):
    """Loaded in bf16 or fp16, transformers casts the query tokens too: the fingerprint is
    taken from the files, so it is the float32 load's (it was 141d... against 67fb...)."""
    from searchengine.models.retrieval import peek_fingerprints

    loaded = RetrievalModel.load(str(tiny_model_dir), device="cpu", dtype=dtype)
    if dtype != "auto":
        assert loaded.vision_dtype == getattr(torch, dtype)
    if dtype == "bfloat16":  # the cause: this transformers keeps them in fp32 for fp16 only
        assert loaded.model.query_tokens.dtype == torch.bfloat16
    assert loaded.fingerprint == model.fingerprint
    assert loaded.fingerprint in peek_fingerprints(str(tiny_model_dir))
    # What earlier versions recorded for a bf16 or fp16 load: the same model, told so.
    rounded = {
        models_fingerprint(loaded, model.model.query_tokens.detach().to(dt).float().numpy()) for dt in (torch.bfloat16, torch.float16)
    }
    assert rounded == loaded.former_fingerprints and model.fingerprint not in rounded


def models_fingerprint(loaded, tokens):
    from searchengine.models.retrieval import fingerprint

    return fingerprint(loaded.model.config, tokens)


def test_fingerprint_of_a_pytorch_bin_checkpoint_is_read_from_its_file(tiny_model_dir, tmp_path, model):
    """A checkpoint saved as pytorch_model.bin (no safetensors) is identified the same way."""
    import shutil

    from searchengine.models.retrieval import stored_query_tokens

    legacy = tmp_path / "bin"
    shutil.copytree(tiny_model_dir, legacy)
    (legacy / "model.safetensors").unlink()
    torch.save(Blip2ForImageTextRetrieval.from_pretrained(tiny_model_dir).state_dict(), legacy / "pytorch_model.bin")
    tokens = stored_query_tokens(str(legacy))
    assert tokens is not None and np.array_equal(tokens, model.model.query_tokens.detach().numpy())
    assert RetrievalModel.load(str(legacy), device="cpu", dtype="bfloat16").fingerprint == model.fingerprint


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
    import searchengine.models.loading as models

    monkeypatch.setattr(models, "cpu_supports_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(models, "cpu_supports_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16


@pytest.mark.parametrize("value, picks", [("1", torch.bfloat16), ("0", torch.float32)])
def test_the_cpu_bf16_variable_overrides_what_the_cpu_says(monkeypatch, value, picks):
    """How .ci/run runs the bf16 path (every GPU's) on CPUs without avx512_bf16, and how a
    user keeps float32 on one that has it."""
    monkeypatch.setenv("SEARCHENGINE_CPU_BF16", value)
    assert resolve_dtype("auto", "cpu") == picks
