"""The indexer's stages: plain picklable callables on plain data, and the local runner's use
of the library (one known-content question per batch of reads)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from indexer.pipeline import Indexer
from indexer.scan import FileEntry
from indexer.stages import CaptionStage, Decoded, DecodeStage, EmbedStage, Failed, Known, Read, ReadStage
from searchengine.imageio import decode_image
from searchengine.library import Library


def _entry(path: Path) -> FileEntry:
    st = path.stat()
    return FileEntry(str(path), st.st_size, st.st_mtime_ns)


def test_the_stages_round_trip_through_pickle_and_compute_what_the_models_do(model, captioner, photo_files, tmp_path):
    read = ReadStage()
    decode = DecodeStage(model.preprocessor, 150_000_000, 320, caption_preprocess=captioner.preprocessor)
    # What a process or cluster runner does with them: ship them elsewhere.
    read, decode = pickle.loads(pickle.dumps(read)), pickle.loads(pickle.dumps(decode))
    entry = _entry(photo_files[0])
    r = read(entry)
    assert isinstance(r, Read) and r.data == photo_files[0].read_bytes() and len(r.sha256) == 64
    d = decode(r)
    assert isinstance(d, Decoded) and d.thumbnail[:2] == b"\xff\xd8"
    image = decode_image(r.data, max_pixels=150_000_000).image
    assert torch.equal(d.pixels, model.preprocess([image])[0])
    assert torch.equal(d.caption_pixels, captioner.preprocess([image])[0])

    [e] = EmbedStage(model, keep_vit=True)([d])
    expected = model.embed_pixels(model.preprocess([image]))
    np.testing.assert_allclose(e.itc, expected.itc[0], rtol=1e-5, atol=1e-6)
    assert e.vit is not None and e.vit.shape == model.vit_shape
    [c] = CaptionStage(captioner)([e])
    assert c.meta.caption == captioner.caption_pixels(captioner.preprocess([image]))[0].text
    assert c.meta.caption_model == captioner.name and d.meta.caption is None  # values are new, never mutated

    # Bad input is a Failed value with a reason; values that need no decoding pass through.
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    failed = decode(read(_entry(junk)))
    assert isinstance(failed, Failed) and failed.reason and "junk.jpg" == Path(failed.entry.path).name
    gone = read(FileEntry(str(tmp_path / "gone.jpg"), 1, 1))
    assert isinstance(gone, Failed) and gone.reason == "vanished"
    known = Known(entry, r.sha256)
    assert decode(known) is known and decode(gone) is gone


def test_the_runner_asks_the_library_about_known_content_once_per_batch(settings, model, photo_files, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, f in enumerate(photo_files[:6]):
        (folder / f"{i}{f.suffix}").write_bytes(f.read_bytes())
    settings = settings.model_copy(update={"batch_size": 4})
    library = Library.open(settings, create=True)
    asked: list[int] = []
    real = library.indexed_hashes

    def counting(hashes):
        hashes = list(hashes)
        asked.append(len(hashes))
        return real(hashes)

    library.indexed_hashes = counting
    decoded: list[str] = []
    indexer = Indexer(model, library, settings)
    decode = indexer.decode_stage

    def spy(item):
        out = decode(item)
        if isinstance(out, Decoded):
            decoded.append(out.entry.path)
        return out

    indexer.decode_stage = spy
    try:
        assert indexer.run([folder]).indexed == 6
        assert asked == [4, 2]  # 6 reads, batches of 4: two questions, not six
        # Copies of indexed content: linked, and never decoded.
        for i, f in enumerate(photo_files[:3]):
            (folder / f"copy{i}{f.suffix}").write_bytes(f.read_bytes())
        decoded.clear(), asked.clear()
        summary = indexer.run([folder])
        assert (summary.linked, summary.indexed, decoded, asked) == (3, 0, [], [3])
    finally:
        library.close()


def test_pixels_are_the_reference_processors_bit_for_bit_and_the_fast_decode_close(model, captioner, photo_files):
    from PIL import Image

    for f in photo_files[:3]:
        image = Image.open(f).convert("RGB")
        size = {"height": model.image_size, "width": model.image_size}
        reference = model.image_processor(images=[image], size=size, return_tensors="pt")["pixel_values"]
        assert torch.equal(model.preprocess([image]), reference)  # resized by PIL first: the same pixels
        reference = captioner.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        assert torch.equal(captioner.preprocess([image]), reference)

    read = ReadStage()
    exact, fast = (DecodeStage(model.preprocessor, 150_000_000, 320, caption_preprocess=captioner.preprocessor,
                               decode=d) for d in ("exact", "fast"))
    assert exact.draft is None and fast.draft == max(320, captioner.preprocessor.side(), model.image_size)
    for f in photo_files[:6]:
        r = read(_entry(f))
        a, b = exact(r), fast(r)
        assert a.meta == b.meta  # the file's own size, EXIF and all
        va, vb = model.embed_pixels(a.pixels[None]).itc[0], model.embed_pixels(b.pixels[None]).itc[0]
        assert (va * vb).sum(-1).min() > 0.999, f  # unit vectors: cosine per query vector
