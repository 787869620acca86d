"""The scan: which files a folder tree lists, symlinked folders included."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from PIL import Image

from indexer.scan import LINK_DUPLICATE, LINK_LOOP, scan_folder
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


def test_a_file_link_is_listed_as_a_file(tmp_path):
    _photo(tmp_path / "real" / "x.jpg", 0)
    (tmp_path / "lib").mkdir()
    os.symlink(tmp_path / "real" / "x.jpg", tmp_path / "lib" / "y.jpg")
    assert [e.path for e in scan_folder(tmp_path / "lib")] == [str(tmp_path / "lib" / "y.jpg")]


def test_a_link_to_the_excluded_data_dir_is_not_followed(tmp_path):
    _photo(tmp_path / "lib" / "a.jpg", 0)
    _photo(tmp_path / "data" / "thumbnails" / "1.jpg", 1)
    os.symlink(tmp_path / "data", tmp_path / "lib" / "data-link")
    got = [e.path for e in scan_folder(tmp_path / "lib", exclude=(tmp_path / "data",))]
    assert got == [str(tmp_path / "lib" / "a.jpg")]
