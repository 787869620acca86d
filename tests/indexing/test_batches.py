"""The one batch rule (searchengine.indexing.batches) that the runners, recaptioning and eval use."""

from __future__ import annotations

from searchengine.indexing.batches import OTHERS_MAX, Sorter, batched
from searchengine.indexing.scan import FileEntry
from searchengine.indexing.stages import Decoded, Embedded, Failed, Known
from searchengine.media.imageio import ImageMeta


def decoded(name: str, sha: str) -> Decoded:
    return Decoded(FileEntry(f"/p/{name}", 1, 1), sha, ImageMeta(4, 4), None, b"")


def test_batched_counts_what_the_model_works_on_and_caps_the_rest():
    assert list(batched(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched([], 3)) == []
    # Items that do not count ride along, up to the cap.
    odd = list(batched(range(10), 2, counts=lambda i: i % 2 == 1))
    assert odd == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [len(b) for b in batched(range(600), 1000, counts=lambda i: False)] == [OTHERS_MAX, OTHERS_MAX, 600 - 2 * OTHERS_MAX]


def test_the_sorter_links_a_copy_seen_earlier_and_reports_failures_as_they_come():
    failed: list[Failed] = []
    sorter = Sorter(2, failed.append)
    bad = Failed(FileEntry("/p/bad.jpg", 1, 1), "unreadable", "no")
    assert sorter.add(decoded("a.jpg", "h1")) is None
    assert sorter.add(bad) is None and failed == [bad]
    assert sorter.add(decoded("copy-of-a.jpg", "h1")) is None  # the same content: linked, not embedded twice
    assert sorter.add(Known(FileEntry("/p/old.jpg", 1, 1), "h0")) is None
    full = sorter.add(decoded("b.jpg", "h2"))
    assert full is not None and [d.entry.path for d in full.new] == ["/p/a.jpg", "/p/b.jpg"]
    assert [(k.entry.path, k.sha256) for k in full.known] == [("/p/copy-of-a.jpg", "h1"), ("/p/old.jpg", "h0")]
    assert full.failed == [bad] and len(full) == 5
    assert not sorter.rest()  # nothing left
    # Embedded results (the Ray runner's) are told apart by their image's content the same way.
    e = Embedded(decoded("c.jpg", "h1"), None, None)
    assert sorter.add(e) is None and [k.sha256 for k in sorter.rest().known] == ["h1"]


def test_links_and_failures_alone_make_a_batch_at_the_cap():
    sorter = Sorter(8, lambda f: None)
    got = [sorter.add(Known(FileEntry(f"/p/{i}.jpg", 1, 1), f"h{i}")) for i in range(OTHERS_MAX)]
    assert all(b is None for b in got[:-1]) and len(got[-1].known) == OTHERS_MAX
