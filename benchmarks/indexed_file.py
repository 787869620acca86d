"""What checking an indexed file on its open descriptor costs a request, against the name
checks it replaced (stat + realpath, then an open by FileResponse), on real photos, in one run:

- before: `os.stat` of the name, `links.inside_library` of the name, then open and read;
- after, first request for a file: open, fstat, the descriptor's real path, the content's
  sha256 against the indexed one, then the read from the same descriptor;
- after, later requests (the file remembered as checked by device, inode, size, mtime and
  ctime): open, fstat, real path, read.

    python benchmarks/indexed_file.py --files 20 --repeat 5
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import photos  # noqa: E402


class Indexed:
    def __init__(self, path: Path) -> None:
        st = path.stat()
        self.path, self.size, self.mtime_ns = str(path), st.st_size, st.st_mtime_ns
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    from searchengine.media.indexed_file import IndexedFileOpener
    from searchengine.media.links import inside_library

    files = [Indexed(p) for p in dict.fromkeys(photos(args.files))]
    roots = sorted({os.path.dirname(f.path) for f in files})

    def before(f: Indexed) -> int:
        st = os.stat(f.path)
        assert st.st_size == f.size and inside_library(f.path, roots, "folders")
        with open(f.path, "rb") as fh:
            return len(fh.read())

    def after(opener: IndexedFileOpener, f: Indexed) -> int:
        with opener.open(0, [f], f.sha256) as opened:
            return len(opened.read())

    def per_file_ms(run) -> float:
        times = []
        for f in files:
            t = time.perf_counter()
            run(f)
            times.append((time.perf_counter() - t) * 1000)
        return statistics.median(times)

    inside = lambda path, real: inside_library(path, roots, "folders", real)  # noqa: E731
    rows = {"before (name checks)": [], "after, first request": [], "after, later requests": []}
    for _ in range(args.repeat):
        rows["before (name checks)"].append(per_file_ms(before))
        opener = IndexedFileOpener(inside)
        rows["after, first request"].append(per_file_ms(lambda f: after(opener, f)))
        rows["after, later requests"].append(per_file_ms(lambda f: after(opener, f)))
    mb = statistics.median(f.size for f in files) / 1e6
    base = statistics.median(rows["before (name checks)"])
    print(f"{len(files)} photos, median {mb:.1f} MB; median ms a request (read included), of {args.repeat} rounds")
    for name, values in rows.items():
        ms = statistics.median(values)
        print(f"  {name:24s} {ms:7.2f} ms  x{ms / base:5.2f}")


if __name__ == "__main__":
    main()
