from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from searchengine.indexing.report import Report
from searchengine.indexing.pipeline import Indexer
from searchengine.indexing.scan import scan_folder
from searchengine.errors import BadImageError
from searchengine.media.imageio import decode_image, read_file
from searchengine.library import Library
from searchengine.search import Searcher
from tests.images import write_awkward, write_bad


class CountingModel:
    """The real model, counting how many images it embeds."""

    def __init__(self, model):
        self._model = model
        self.embedded = 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def embed_pixels(self, pixels):
        self.embedded += len(pixels)
        return self._model.embed_pixels(pixels)


def run(settings, model, *folders, **kwargs):
    library = Library.open(settings, create=True)
    try:
        return Indexer(model, library, settings, **kwargs).run(list(folders))
    finally:
        library.close()


def consistent(settings) -> set[int]:
    """Store and FAISS index hold the same images; return their ids."""
    library = Library.open(settings)
    try:
        store_ids = set(library.store.image_ids().tolist())
        assert set(library.index.ids().tolist()) == store_ids
        from searchengine.vectors.exact import VectorIndex

        saved = VectorIndex.load(settings.vectors_path, library.index.dim, library.index.num_vectors)
        assert set(saved.ids().tolist()) == store_ids  # the file on disk too, without repair
        return store_ids
    finally:
        library.close()


@pytest.fixture
def folder(tmp_path, photo_files):
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    for i, f in enumerate(photo_files[:8]):
        shutil.copy(f, (d / "sub" if i % 2 else d) / f.name)
    return d


def search(settings, model, text, **kw):
    kw.setdefault("mode", "semantic")  # these tests check the embedding side; test_hybrid checks the rest
    library = Library.open(settings)
    try:
        return Searcher(model, library, settings).search(text, **kw)
    finally:
        library.close()


def test_scores_from_the_index_equal_the_model(settings, model, folder):
    # On the exact decode the index holds the reference's own numbers; the fast decode's
    # difference is measured (tests/indexing/test_stages.py, benchmarks/feed_rate.py).
    settings = settings.model_copy(update={"decode": "exact"})
    summary = run(settings, model, folder)
    assert summary.indexed == 8 and summary.skipped == 0
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    images = [decode_image(p.read_bytes(), max_pixels=10**9).image for p in files]
    emb = model.embed_images(images)
    text = "yellow flower in a green meadow"
    t = model.embed_texts([text])[0]
    want_itc = dict(zip(map(str, files), (emb.itc @ t).max(axis=1)))
    want_itm = dict(zip(map(str, files), model.itm(text, emb.vit)))

    plain = search(settings, model, text, k=8, rerank=0)
    assert len(plain.hits) == 8 and plain.reranked == 0
    for h in plain.hits:
        assert h.itc == pytest.approx(want_itc[h.path], abs=2e-3)  # stored as float16 (issue 11: within 2e-3)
        assert h.itm is None and h.score == h.itc
    assert [h.itc for h in plain.hits] == sorted((h.itc for h in plain.hits), reverse=True)

    reranked = search(settings, model, text, k=8, rerank=5)
    assert reranked.reranked == 5
    top, rest = reranked.hits[:5], reranked.hits[5:]
    for h in top:
        # ITM from the fp16 feature cache: equal up to fp16 rounding of the ViT output.
        assert h.itm == pytest.approx(want_itm[h.path], abs=2e-3)
        assert h.score == pytest.approx(h.itm + h.itc, abs=1e-6)
    assert {h.path for h in top} == {h.path for h in plain.hits[:5]}  # ITM re-ranks the ITC top 5
    assert [h.score for h in top] == sorted((h.score for h in top), reverse=True)
    assert all(h.itm is None for h in rest)
    assert set(reranked.timings_ms) >= {"encode", "ann", "rerank", "total"}


def reference_itm(model, folder, text: str) -> dict[str, float]:
    """ITM of every file with the ViT run fresh, in the model's dtype: the reference."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    emb = model.embed_images([decode_image(p.read_bytes(), max_pixels=10**9).image for p in files])
    return dict(zip(map(str, files), model.itm(text, emb.vit).tolist()))


def test_recompute_mode_is_exact_and_the_cache_within_its_rounding(settings, model, folder):
    run(settings, model, folder)
    want = reference_itm(model, folder, "two elephants")
    cached = search(settings, model, "two elephants", k=4, rerank=4)
    recompute = settings.model_copy(update={"itm_features": "recompute"})
    fresh = search(recompute, model, "two elephants", k=4, rerank=4)
    for h in fresh.hits:  # the model's own dtype end to end: no fp16 rounding on this path
        assert h.itm == pytest.approx(want[h.path], abs=1e-6)
    for h in cached.hits:  # the fp16 cache: within its rounding, as the README states
        assert h.itm == pytest.approx(want[h.path], abs=4e-4)


@pytest.mark.dtype
def test_in_bf16_the_feature_cache_gives_what_recomputing_does(settings, tiny_model_dir, folder):
    """bf16 on a CPU (avx512_bf16) keeps the feature cache, as fp32 does: its fp16 entries hold
    bf16's values exactly within fp16's range, so ITM from the cache is the recomputed ITM."""
    from searchengine.models.retrieval import RetrievalModel

    bf16 = RetrievalModel.load(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    s = settings.model_copy(update={"dtype": "bfloat16"})
    run(s, bf16, folder)
    assert len(list(s.features_dir.rglob("*.npy"))) == 8
    cached = search(s, bf16, "two elephants", k=4, rerank=4)
    fresh = search(s.model_copy(update={"itm_features": "recompute"}), bf16, "two elephants", k=4, rerank=4)
    want = {h.path: h.itm for h in fresh.hits}
    for h in cached.hits:
        assert h.path in want and h.itm == pytest.approx(want[h.path], abs=1e-3)


def test_missing_cache_entries_are_recomputed(settings, model, folder):
    run(settings, model, folder)
    want = reference_itm(model, folder, "a dog on the beach")
    before = search(settings, model, "a dog on the beach", k=3, rerank=3)
    shutil.rmtree(settings.features_dir)
    after = search(settings, model, "a dog on the beach", k=3, rerank=3)
    assert {h.path for h in after.hits} == {h.path for h in before.hits}  # (near-ties may swap: fp16 vs exact)
    for h in after.hits:
        assert h.itm == pytest.approx(want[h.path], abs=1e-6)
    assert len(list(settings.features_dir.rglob("*.npy"))) == 3  # and put back in the cache


def test_second_run_embeds_nothing(settings, model, folder):
    counting = CountingModel(model)
    run(settings, counting, folder)
    assert counting.embedded == 8
    summary = run(settings, counting, folder)
    assert counting.embedded == 8
    assert (summary.indexed, summary.unchanged) == (0, 8)


def test_duplicates_are_embedded_once_and_both_listed(settings, model, folder):
    original = next(folder.glob("*.*"))
    copy = folder / "sub" / "copy-of-it.jpg"
    shutil.copy(original, copy)
    counting = CountingModel(model)
    summary = run(settings, counting, folder)
    assert counting.embedded == 8 and summary.indexed + summary.linked == 9
    hits = search(settings, model, "a photo", k=20, rerank=0).hits
    assert len(hits) == 8
    (dup,) = [h for h in hits if len(h.paths) == 2]
    assert set(dup.paths) == {str(original), str(copy)}
    assert len(consistent(settings)) == 8


def test_deleted_and_changed_files_leave_the_index(settings, model, folder, photo_files):
    run(settings, model, folder)
    ids_before = consistent(settings)
    victims = sorted(folder.rglob("*.*"))[:2]
    victims[0].unlink()
    replacement = photo_files[-1].read_bytes()  # not among the 8 indexed
    victims[1].write_bytes(replacement)
    os.utime(victims[1], ns=(1, 1))
    summary = run(settings, model, folder)
    assert (summary.removed, summary.indexed) == (1, 1)
    ids_after = consistent(settings)
    assert len(ids_after) == 7 and len(ids_before - ids_after) == 2 and len(ids_after - ids_before) == 1
    paths = {p for h in search(settings, model, "sky", k=20, rerank=0).hits for p in h.paths}
    assert str(victims[0]) not in paths and str(victims[1]) in paths
    library = Library.open(settings)
    assert library.features.ids() == ids_after  # no cache entries left for gone images
    assert library.thumbnails.ids() == ids_after  # made at index time, gone with the image
    library.close()


def test_bad_files_are_skipped_with_reasons_and_the_index_stays_consistent(settings, model, folder, photo_files):
    bad = write_bad(folder / "bad", photo_files[0].read_bytes())
    awkward = write_awkward(folder / "awkward")
    skipped = []
    summary = run(settings, model, folder, report=Report(skipped=lambda p, m: skipped.append(p)))
    assert summary.indexed == 8 + len(awkward)
    assert dict(summary.failed) == {reason: 1 for reason in bad}
    assert sorted(skipped) == sorted(str(p) for p in bad.values())
    library = Library.open(settings)
    stats = library.store.stats()
    library.close()
    assert stats.failures_by_reason == {reason: 1 for reason in bad}
    assert len(consistent(settings)) == stats.images == 8 + len(awkward)
    # Unchanged bad files are not retried, and stay listed.
    again = run(settings, model, folder)
    assert again.skipped == 0 and again.unchanged == 8 + len(awkward) + len(bad)


def test_exif_rotation_is_applied_before_embedding(settings, model, tmp_path):
    from PIL import Image

    from tests.images import exif_rotated_jpeg, gradient

    folder = tmp_path / "rot"
    folder.mkdir()
    (folder / "rotated.jpg").write_bytes(exif_rotated_jpeg(gradient(), orientation=6))
    run(settings, model, folder)
    library = Library.open(settings)
    _, stored = next(library.store.iter_vectors())
    library.close()
    decoded = decode_image((folder / "rotated.jpg").read_bytes(), max_pixels=10**9).image
    upright = model.embed_images([decoded]).itc[0]
    as_stored_on_disk = model.embed_images([Image.open(folder / "rotated.jpg").convert("RGB")]).itc[0]
    np.testing.assert_allclose(stored[0], upright, atol=1e-3)  # stored as float16
    assert np.abs(stored[0] - as_stored_on_disk).max() > 1e-3  # rotation really changes the vectors


def test_a_file_that_vanishes_mid_scan_is_skipped(settings, model, folder):
    victim = sorted(folder.rglob("*.*"))[3]

    def scanner(root, **kw):
        for entry in scan_folder(root, **kw):
            yield entry
            if entry.path == str(victim):
                victim.unlink()  # listed, then gone before it is read

    summary = run(settings, model, folder, scanner=scanner)
    assert summary.indexed == 7 and dict(summary.failed) == {"vanished": 1}
    assert len(consistent(settings)) == 7


def test_an_unreadable_file_is_skipped(settings, model, folder):
    victim = str(sorted(folder.rglob("*.*"))[2])
    if os.geteuid() != 0:
        os.chmod(victim, 0)
        reader = read_file
    else:  # root reads any file: make the reader see what a user without permission sees

        def reader(path):
            if path == victim:
                raise BadImageError("unreadable", "permission denied")
            return read_file(path)

    summary = run(settings, model, folder, reader=reader)
    assert dict(summary.failed) == {"unreadable": 1} and summary.indexed == 7
    assert len(consistent(settings)) == 7


def test_non_folders_are_refused(settings, model, tmp_path):
    from searchengine.errors import SearchEngineError

    with pytest.raises(SearchEngineError, match="does not exist"):
        run(settings, model, tmp_path / "missing")
    (tmp_path / "f.jpg").write_bytes(b"x")
    with pytest.raises(SearchEngineError, match="not a folder"):
        run(settings, model, tmp_path / "f.jpg")


def test_a_different_model_is_refused(settings, model, folder, tmp_path):
    from searchengine.errors import ModelMismatchError
    from searchengine.models.retrieval import RetrievalModel
    from searchengine.models.tiny import build_tiny_model

    run(settings, model, folder)
    other = RetrievalModel.load(str(build_tiny_model(tmp_path / "other", seed=7)), device="cpu")
    with pytest.raises(ModelMismatchError, match="is another checkpoint"):
        run(settings, other, folder)
    with pytest.raises(ModelMismatchError):
        search(settings, other, "dog")


def test_copies_split_across_batches_are_linked(settings, model, tmp_path, photo_files):
    # The copy is decoded (by the look-ahead threads) before the batch holding the original
    # is committed, so only the run's own memory of what it embedded can link it.
    folder = tmp_path / "dups"
    folder.mkdir()
    data = photo_files[0].read_bytes()
    for i, f in enumerate(photo_files[1:6]):
        shutil.copy(f, folder / f"b{i}{f.suffix}")
    (folder / "a.jpg").write_bytes(data)
    (folder / "a_copy.jpg").write_bytes(data)  # next in scan order: read in the same window
    counting = CountingModel(model)
    summary = run(settings.model_copy(update={"batch_size": 1}), counting, folder)
    assert (summary.indexed, summary.linked, counting.embedded) == (6, 1, 6)
    assert len(consistent(settings)) == 6


def test_a_moved_file_keeps_its_id_and_is_not_embedded_again(settings, model, folder):
    run(settings, model, folder)
    victim = sorted(folder.glob("*.*"))[0]
    before = search(settings, model, "tree", k=20, rerank=0).hits
    old_id = next(h.image_id for h in before if h.path == str(victim))
    target = folder / "sub" / "moved-here.jpg"
    victim.rename(target)
    counting = CountingModel(model)
    summary = run(settings, counting, folder)
    # A move, said as one: not a removal plus a duplicate linked.
    assert counting.embedded == 0 and (summary.moved, summary.removed, summary.linked) == (1, 0, 0)
    after = search(settings, model, "tree", k=20, rerank=0).hits
    assert next(h.image_id for h in after if h.path == str(target)) == old_id
    assert len(consistent(settings)) == 8


def test_a_copy_is_a_duplicate_and_a_deletion_a_removal(settings, model, folder):
    run(settings, model, folder)
    first, second = sorted(folder.glob("*.*"))[:2]
    shutil.copy(first, folder / "copy.jpg")
    second.unlink()
    summary = run(settings, model, folder)
    assert (summary.moved, summary.removed, summary.linked, summary.indexed) == (0, 1, 1, 0)


def test_a_duplicate_is_shown_under_the_original_path(settings, model, tmp_path, photo_files):
    folder = tmp_path / "photos"
    folder.mkdir()
    original = folder / "zebra.jpg"
    shutil.copy(photo_files[0], original)
    run(settings, model, folder)
    copy = folder / "aardvark.jpg"  # added later; sorts before the original
    shutil.copy(original, copy)
    summary = run(settings, model, folder)
    assert summary.linked == 1
    for mode in ("semantic", "keyword"):
        (hit,) = search(settings, model, "zebra", k=5, rerank=0, mode=mode).hits
        assert hit.path == str(original) and hit.paths == [str(original), str(copy)], mode


def _phone_photos(folder):
    """A real HEIC (as iPhones write) and a real AVIF, of the same picture."""
    import pillow_heif
    from PIL import Image

    from tests.images import gradient

    pillow_heif.register_heif_opener()
    folder.mkdir()
    Image.fromarray(gradient()).save(folder / "IMG_5001.HEIC", "HEIF", quality=90)
    Image.fromarray(gradient()[::-1].copy()).save(folder / "sunset.avif", "AVIF", quality=90)
    return folder / "IMG_5001.HEIC", folder / "sunset.avif"


def test_heic_and_avif_photos_are_indexed(settings, model, tmp_path):
    heic, avif = _phone_photos(tmp_path / "phone")
    summary = run(settings, model, tmp_path / "phone")
    assert (summary.indexed, summary.skipped) == (2, 0), summary.failures
    paths = {p for h in search(settings, model, "a photo", k=5, rerank=0).hits for p in h.paths}
    assert paths == {str(heic), str(avif)}


def test_a_missing_codec_is_a_skip_that_names_the_package(settings, model, tmp_path, monkeypatch):
    from PIL import Image

    from searchengine.media.imageio import decode_image

    heic, avif = _phone_photos(tmp_path / "phone")
    decode_image(heic.read_bytes(), max_pixels=10**6)  # the codecs are there and registered...
    for fmt in ("HEIF", "AVIF"):  # ...until they are taken away, as on an install without them
        monkeypatch.setattr(Image, "ID", [i for i in Image.ID if i != fmt])
        monkeypatch.delitem(Image.OPEN, fmt)
    skipped = []
    summary = run(settings, model, tmp_path / "phone", report=Report(skipped=lambda path, message: skipped.append((path, message))))
    assert summary.indexed == 0 and summary.failed == {"unsupported_format": 2}
    messages = dict(skipped)
    assert "pip install pillow-heif" in messages[str(heic)]
    assert "AVIF" in messages[str(avif)] and "pip install -U pillow" in messages[str(avif)]


def test_photos_in_symlinked_folders_are_indexed_once(settings, model, tmp_path):
    from tests.indexing.test_scan import linked_tree

    root, _ = linked_tree(tmp_path)
    counting = CountingModel(model)
    skips = []
    summary = run(settings, counting, root, report=Report(skipped=lambda path, message: skips.append(path)))
    assert (summary.indexed, summary.linked, summary.skipped, summary.links_skipped) == (3, 0, 0, 4)
    assert counting.embedded == 3 and len(skips) == 4  # each not-followed link is reported
    paths = {p for h in search(settings, model, "a photo", k=10, rerank=0).hits for p in h.paths}
    assert paths == {str(root / "a.jpg"), str(root / "sub" / "b.jpg"), str(root / "ext1" / "c.jpg")}
    again = run(settings, counting, root)
    assert (again.unchanged, again.indexed, again.removed) == (3, 0, 0)


def test_the_dtype_and_device_of_each_run_that_embedded_are_recorded(settings, model, folder, tmp_path, photo_files):
    """As a Ray run's GPU actors embed in bf16 for a CPU driver: what is recorded is how the
    vectors were made, batch by batch, not how the driver loaded its model."""
    elsewhere = CountingModel(model)
    elsewhere.made_by = "bfloat16 on cuda"
    run(settings, elsewhere, folder)
    assert run(settings, model, folder).indexed == 0  # embedded nothing: nothing recorded
    library = Library.open(settings)
    assert library.store.made_by() == ["bfloat16 on cuda"]
    library.close()
    more = tmp_path / "more"
    more.mkdir()
    shutil.copy(photo_files[9], more / "new.jpg")
    run(settings, model, folder, more)
    library = Library.open(settings)
    assert library.store.made_by() == ["bfloat16 on cuda", "float32 on cpu"]
    library.close()
