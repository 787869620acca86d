"""The indexer's stages: plain picklable callables on plain data, and the local runner's use
of the library (one known-content question per batch of reads)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from searchengine.indexing.pipeline import Indexer
from searchengine.indexing.scan import FileEntry
from searchengine.indexing.stages import CaptionStage, Decoded, DecodeStage, EmbedStage, Failed, Known, Read, ReadStage
from searchengine.media.imageio import decode_image
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
    real = library.catalog.indexed_hashes

    def counting(hashes):
        hashes = list(hashes)
        asked.append(len(hashes))
        return real(hashes)

    library.catalog.indexed_hashes = counting
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


def test_batch_k_is_written_while_batch_k_plus_1_is_embedded(settings, model, photo_files, tmp_path):
    """The model lane: the runner commits a batch while the next one computes, and the index
    ends the same as a run that did one thing at a time."""
    import threading

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, f in enumerate(photo_files[:6]):
        (folder / f"{i}{f.suffix}").write_bytes(f.read_bytes())
    settings = settings.model_copy(update={"batch_size": 2})
    library = Library.open(settings, create=True)
    events: list[tuple[str, int, str]] = []
    second_embed_started = threading.Event()
    overlapped: list[bool] = []
    real_write, real_embed = library.write_batch, model.embed_pixels

    def write_batch(new, links, failures):
        events.append(("write", len(new), threading.current_thread().name))
        if len([e for e in events if e[0] == "write"]) == 1:
            # The first batch's write waits for the second batch's embedding to begin: it
            # does only where the two run at once (one at a time, this wait would time out).
            overlapped.append(second_embed_started.wait(timeout=30))
        return real_write(new=new, links=links, failures=failures)

    def embed_pixels(pixels):
        events.append(("embed", pixels.shape[0], threading.current_thread().name))
        if len([e for e in events if e[0] == "embed"]) == 2:
            second_embed_started.set()
        return real_embed(pixels)

    library.write_batch = write_batch
    model.embed_pixels = embed_pixels
    try:
        summary = Indexer(model, library, settings).run([folder])
        assert summary.indexed == 6 and overlapped == [True]
        embeds = [e for e in events if e[0] == "embed"]
        writes = [e for e in events if e[0] == "write"]
        assert [n for _, n, _ in embeds] == [2, 2, 2] and [n for _, n, _ in writes] == [2, 2, 2]
        # The models run in the lane; the Library is touched by the runner's thread alone.
        assert {t for _, _, t in embeds} != {threading.current_thread().name}
        assert {t for _, _, t in writes} == {threading.current_thread().name}
        assert len(library.catalog.files_under(str(folder))) == 6
    finally:
        model.embed_pixels = real_embed
        library.close()


def test_a_batch_too_large_for_the_device_is_embedded_in_halves(model, photo_files):
    """An out-of-memory error on a batch splits it (recursively); the vectors are the ones the
    whole batch would have had, in order. A single image that does not fit still fails."""
    decode = DecodeStage(model.preprocessor, 150_000_000, 64)
    items = [decode(ReadStage()(_entry(f))) for f in photo_files[:5]]
    stage = EmbedStage(model, keep_vit=True)
    expected = stage(items)
    sizes: list[int] = []
    real = model.embed_pixels

    def small_device(pixels):
        sizes.append(pixels.shape[0])
        if pixels.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(pixels)

    model.embed_pixels = small_device
    try:
        got = stage(items)
        assert sizes == [5, 2, 3, 1, 2]  # 5 -> 2 + 3, and 3 -> 1 + 2
        assert [g.entry for g in got] == [e.entry for e in expected]
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g.itc, e.itc, atol=1e-5)
            np.testing.assert_allclose(g.vit, e.vit, atol=1e-4)
        model.embed_pixels = lambda pixels: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("too big"))
        try:
            stage(items[:1])
        except torch.cuda.OutOfMemoryError:
            pass
        else:
            raise AssertionError("one image that does not fit must fail, not loop")
    finally:
        model.embed_pixels = real


def test_pixels_are_staged_for_the_device_they_run_on(model, photo_files):
    """On a CPU a batch is its stacked pixels, ready at once (on a CUDA GPU the same call
    copies them from pinned memory on a side stream: not run here, there is no GPU)."""
    from searchengine.indexing.stages import stage_pixels

    pixels = [torch.rand(3, 8, 8) for _ in range(3)]
    staged = stage_pixels(pixels, "cpu")
    assert staged.ready is None and torch.equal(staged.wait(), torch.stack(pixels))
    assert EmbedStage(model).stage([]) is None
