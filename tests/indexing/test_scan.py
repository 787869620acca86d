"""The scan: which files a folder tree lists, symlinked folders included."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from PIL import Image

from searchengine.indexing.scan import LINK_DUPLICATE, LINK_LOOP, LINK_OUTSIDE, scan_folder
from tests.images import gradient


def _photo(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gradient()[:, :: 1 if seed % 2 else -1] // (seed + 1)).save(path)


def linked_tree(base: Path) -> tuple[Path, dict[str, str]]:
    """A library with every kind of folder link; returns the root and the links it holds."""
    root, outside = base / "photos", base / "outside"
    _photo(root / "a.jpg", 0)
    _photo(root / "sub" / "b.jpg", 1)
    _photo(outside / "c.jpg", 2)
    links = {
        "sub/up": "..",  # back to the root: a loop
        "top": "..",  # to the root's parent, which holds the root: a loop too
        "aa_link": "sub",  # a folder inside the root, under a name that sorts before it
        "ext1": "../outside",  # a folder outside the root...
        "sub/ext2": "../../outside",  # ...linked to twice
    }
    for name, target in links.items():
        os.symlink(target, root / name, target_is_directory=True)
    return root, links


def test_folder_links_are_followed_once_each_and_loops_are_not(tmp_path):
    root, _ = linked_tree(tmp_path)
    skipped: dict[str, str] = {}
    listed = list(itertools.islice(scan_folder(root, on_skipped_link=skipped.__setitem__), 100))
    # Each real file once, the folder inside the root under its real path, the outside one
    # under the first link in scan order.
    assert [e.path for e in listed] == [str(root / "a.jpg"), str(root / "sub" / "b.jpg"), str(root / "ext1" / "c.jpg")]
    assert skipped == {
        str(root / "aa_link"): LINK_DUPLICATE,
        str(root / "top"): LINK_LOOP,
        str(root / "sub" / "ext2"): LINK_DUPLICATE,
        str(root / "sub" / "up"): LINK_LOOP,
    }


def test_a_file_link_is_listed_where_it_leads_inside_the_library(tmp_path):
    lib = tmp_path / "lib"
    _photo(lib / "originals" / "x.jpg", 0)
    _photo(tmp_path / "other" / "z.jpg", 1)
    os.symlink(lib / "originals" / "x.jpg", lib / "y.jpg")
    os.symlink(tmp_path / "other" / "z.jpg", lib / "w.jpg")  # into another folder of the library
    assert [e.path for e in scan_folder(lib, roots=(lib, tmp_path / "other"))] == [
        str(lib / "w.jpg"), str(lib / "y.jpg"), str(lib / "originals" / "x.jpg")
    ]


def test_a_file_link_that_leads_outside_the_library_is_followed_only_when_allowed(tmp_path):
    lib, outside = tmp_path / "lib", tmp_path / "home" / "other-user"
    _photo(lib / "a.jpg", 0)
    _photo(outside / "private.jpg", 1)
    os.symlink(outside / "private.jpg", lib / "b.jpg")
    for policy in ("folders", "none"):
        skipped: dict[str, str] = {}
        got = [e.path for e in scan_folder(lib, links=policy, on_skipped_link=skipped.__setitem__)]
        assert got == [str(lib / "a.jpg")] and skipped == {str(lib / "b.jpg"): LINK_OUTSIDE}, policy
    assert [e.path for e in scan_folder(lib, links="all")] == [str(lib / "a.jpg"), str(lib / "b.jpg")]


def test_inside_a_linked_folder_file_links_may_lead_within_that_folder_only(tmp_path):
    root, _ = linked_tree(tmp_path)  # root/ext1 -> outside/, which holds c.jpg
    outside = tmp_path / "outside"
    _photo(outside / "deep" / "d.jpg", 3)
    _photo(tmp_path / "elsewhere" / "e.jpg", 4)
    os.symlink(outside / "deep" / "d.jpg", outside / "d-link.jpg")  # within the linked folder: listed
    os.symlink(tmp_path / "elsewhere" / "e.jpg", outside / "e-link.jpg")  # out of it: not
    skipped: dict[str, str] = {}
    got = [e.path for e in scan_folder(root, on_skipped_link=skipped.__setitem__)]
    assert str(root / "ext1" / "d-link.jpg") in got and str(root / "ext1" / "deep" / "d.jpg") in got
    assert str(root / "ext1" / "e-link.jpg") not in got
    assert skipped[str(root / "ext1" / "e-link.jpg")] == LINK_OUTSIDE


def test_with_links_none_folder_links_that_lead_outside_are_not_followed(tmp_path):
    root, _ = linked_tree(tmp_path)
    skipped: dict[str, str] = {}
    got = [e.path for e in scan_folder(root, links="none", on_skipped_link=skipped.__setitem__)]
    assert got == [str(root / "a.jpg"), str(root / "sub" / "b.jpg")]
    assert skipped[str(root / "ext1")] == LINK_OUTSIDE


def test_a_link_to_the_excluded_data_dir_is_not_followed(tmp_path):
    _photo(tmp_path / "lib" / "a.jpg", 0)
    _photo(tmp_path / "data" / "thumbnails" / "1.jpg", 1)
    os.symlink(tmp_path / "data", tmp_path / "lib" / "data-link")
    got = [e.path for e in scan_folder(tmp_path / "lib", exclude=(tmp_path / "data",))]
    assert got == [str(tmp_path / "lib" / "a.jpg")]
