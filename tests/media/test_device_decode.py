"""decode = "device": JPEGs decoded and resized as tensors on the model's device. Here the
device is the CPU (PIL's decode stands in for nvJPEG, which needs a CUDA GPU); everything
after the decode is the code a GPU runs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from searchengine.indexing.scan import FileEntry
from searchengine.indexing.stages import Decoded, DecodeStage, EmbedStage, Failed, ReadStage
from searchengine.media import device_decode
from searchengine.media.device_decode import decode_on_device, model_input, orient, pil_jpeg
from searchengine.errors import SearchEngineError
from searchengine.media.imageio import decode_image
from tests.images import exif_rotated_jpeg, gradient, save, write_awkward, write_bad


def _entry(path: Path) -> FileEntry:
    st = path.stat()
    return FileEntry(str(path), st.st_size, st.st_mtime_ns)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_turned_as_pil_turns_it(orientation):
    arr = np.random.default_rng(orientation).integers(0, 255, (24, 40, 3), dtype=np.uint8)
    data = exif_rotated_jpeg(arr, orientation)
    got = decode_on_device(data, max_pixels=10**8, decoder=pil_jpeg)
    expected = decode_image(data, max_pixels=10**8)
    assert np.array_equal(got.pixels.permute(1, 2, 0).numpy(), np.asarray(expected.image))
    assert (got.meta.width, got.meta.height) == (expected.meta.width, expected.meta.height)
    with Image.open(io.BytesIO(data)) as im:  # the reference: what PIL shows
        assert np.array_equal(np.asarray(ImageOps.exif_transpose(im).convert("RGB")), np.asarray(expected.image))
    assert orient(torch.zeros(3, 24, 40), orientation).shape[1:] == ((40, 24) if orientation >= 5 else (24, 40))


def test_the_model_inputs_are_the_reference_processors_but_for_rounding(model, captioner, photo_files):
    """On real photos decoded in full: each pixel value within rounding of the processor's (the
    same bicubic kernel), and the ITC vectors at cosine >= 0.9999."""
    for path in photo_files[:4]:
        data = path.read_bytes()
        if Image.open(path).format != "JPEG":
            continue
        got = decode_on_device(data, max_pixels=10**9, decoder=pil_jpeg)
        image = decode_image(data, max_pixels=10**9).image
        for pre in (model.preprocessor, captioner.preprocessor):
            ours, ref = model_input(got.pixels, pre), pre([image])[0]
            assert ours.shape == ref.shape
            # One 8-bit step after normalising is 1/255/std (about 0.015 for CLIP's std).
            step = 1 / 255 / min(pre.image_processor.image_std)
            diff = (ours - ref).abs()
            assert diff.max() <= 3 * step and diff.mean() <= 0.25 * step
        a = model.embed_pixels(model_input(got.pixels, model.preprocessor)[None]).itc[0]
        b = model.embed_pixels(model.preprocessor([image])).itc[0]
        assert (a * b).sum(-1).min() >= 0.9999


def test_the_device_path_handles_every_file_the_others_do(model, captioner, photo_files, tmp_path):
    """Awkward files (CMYK, 16-bit, palette, alpha, rotated) and bad ones get the same outcome
    as with decode fast: non-JPEGs and CMYK go through PIL unchanged; bad files fail with the
    same reasons."""
    awkward = write_awkward(tmp_path / "awkward")
    bad = write_bad(tmp_path / "bad", photo_files[0].read_bytes())
    photo = [p for p in photo_files if p.suffix.lower() in (".jpg", ".jpeg")][0]
    args = (model.preprocessor, 150_000_000, 320, 82, captioner.preprocessor)
    device, fast = DecodeStage(*args, decode="device", device="cpu"), DecodeStage(*args, decode="fast")
    read = ReadStage()
    for name, path in [*awkward.items(), *bad.items(), ("photo", photo)]:
        r = read(_entry(path))
        a, b = device(r), fast(r)
        assert type(a) is type(b), name
        if isinstance(a, Failed):
            assert a.reason == b.reason == name, name
            continue
        assert isinstance(a, Decoded) and a.thumbnail[:2] == b"\xff\xd8"
        assert (a.meta.width, a.meta.height, a.meta.camera, a.meta.taken_at) == (b.meta.width, b.meta.height, b.meta.camera, b.meta.taken_at)
        if name in ("cmyk", "png16", "gif", "webp_alpha", "unicode", "bmp", "tiff"):
            assert torch.equal(a.pixels, b.pixels) and torch.equal(a.caption_pixels, b.caption_pixels), name
        else:  # the JPEGs took the tensor path: other rounding, the same picture
            assert not torch.equal(a.pixels, b.pixels), name
            emb = EmbedStage(model)([a, b])
            assert (emb[0].itc * emb[1].itc).sum(-1).min() >= 0.999, name
            with Image.open(io.BytesIO(a.thumbnail)) as t:
                assert max(t.size) == min(320, max(a.meta.width, a.meta.height))


def test_a_gpu_without_torchvision_is_refused_before_the_run(monkeypatch):
    import importlib

    real = importlib.import_module

    def no_torchvision(name, *args):
        if name.startswith("torchvision"):
            raise ImportError("No module named 'torchvision'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_torchvision)
    with pytest.raises(SearchEngineError, match="torchvision.*decode fast"):
        device_decode.check("cuda:0")
    device_decode.check("cpu")  # the CPU path needs no torchvision
    assert device_decode.decoder_for("cpu") is pil_jpeg


def test_a_jpeg_the_decoder_refuses_goes_to_pil(model):
    data = save(Image.fromarray(gradient()), "JPEG", quality=90)

    def refuses(data, draft):
        raise RuntimeError("nvjpeg: unsupported")

    assert decode_on_device(data, max_pixels=10**8, decoder=refuses) is None
    assert decode_on_device(save(Image.fromarray(gradient()), "PNG"), max_pixels=10**8, decoder=pil_jpeg) is None


def test_fast_and_device_decodes_rank_as_the_exact_one_on_the_trained_fixture(colour_model_dir, tmp_path):
    """The colour-trained tiny model, 40 large JPEGs of coloured pictures (so that the fast
    and device paths decode at reduced scale): each colour's top 10 is the exact path's, and
    every ITC vector within cosine 0.999 of it."""
    from searchengine.models.retrieval import RetrievalModel
    from tests.trained import COLOURS, colour_picture

    model = RetrievalModel.load(str(colour_model_dir), device="cpu", dtype="float32")
    rng = np.random.default_rng(7)
    entries = []
    for i in range(40):
        path = tmp_path / f"{i:02d}.jpg"
        colour_picture(list(COLOURS)[i % 4], rng).resize((1600, 1200), Image.Resampling.BICUBIC).save(path, quality=90)
        entries.append(_entry(path))
    read = ReadStage()
    reads = [read(e) for e in entries]
    vectors = {}
    for how in ("exact", "fast", "device"):
        stage = DecodeStage(model.preprocessor, 10**8, 320, decode=how, device="cpu")
        decoded = [stage(r) for r in reads]
        assert all(isinstance(d, Decoded) for d in decoded)
        vectors[how] = np.stack([e.itc for e in EmbedStage(model)(decoded)])
    texts = model.embed_texts(list(COLOURS))
    for how in ("fast", "device"):
        assert (vectors[how] * vectors["exact"]).sum(-1).min() >= 0.999, how
        for c, t in zip(COLOURS, texts):
            top = lambda v: list(np.argsort(-(v @ t).max(-1), kind="stable")[:10])
            exact = top(vectors["exact"])
            assert {i % 4 for i in exact} == {list(COLOURS).index(c)}  # the fixture sees colour
            assert set(top(vectors[how])) == set(exact), (how, c)


def test_a_processor_the_tensor_path_cannot_follow_sends_files_to_pil_undecoded(model, photo_files, monkeypatch):
    """A processor that crops (or pads) is not `tensor_ready`: the device path then decodes
    nothing itself, and the result is the fast path's, bit for bit."""
    from dataclasses import replace

    from searchengine.media import device_decode
    from searchengine.media.device_decode import tensor_ready

    assert tensor_ready(model.preprocessor)
    cropping = replace(model.preprocessor, image_processor=replace_attr(
        model.preprocessor.image_processor, do_center_crop=True, crop_size={"height": 20, "width": 20}))
    assert not tensor_ready(cropping)
    calls = []
    monkeypatch.setattr(device_decode, "decode_on_device", lambda *a, **k: calls.append(1))
    photo = [p for p in photo_files if p.suffix.lower() in (".jpg", ".jpeg")][0]
    r = ReadStage()(_entry(photo))
    a = DecodeStage(cropping, 150_000_000, 64, decode="device", device="cpu")(r)
    b = DecodeStage(cropping, 150_000_000, 64, decode="fast")(r)
    assert isinstance(b, Decoded), b
    assert calls == [] and torch.equal(a.pixels, b.pixels)


def replace_attr(obj, **changes):
    import copy

    out = copy.deepcopy(obj)
    for k, v in changes.items():
        setattr(out, k, v)
    return out
