"""SQL statements and latency per fresh text query, through the API's path and the CLI's.

    python benchmarks/query_sql.py [-n 60] [--repeat 5]

Indexes `-n` real photos with the tiny model (no captions), then for each mode runs fresh
queries (no kept ranking: the revision changes or the words do) and counts the statements
the store executes (SQLAlchemy's `before_cursor_execute`), in the service (`/api/search`'s
path, after its periodic refresh) and in the CLI's one-shot search. Prints counts and the
median latency of each.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import model_dir, photos, quiet  # noqa: E402

PHRASES = ["a photo of {}", "{} at dusk", "the {} in winter"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--show", action="store_true", help="print each statement")
    args = ap.parse_args()
    quiet()
    import shutil

    from sqlalchemy import event

    from searchengine.indexing.pipeline import Indexer
    from searchengine.library import Library
    from searchengine.models.retrieval import RetrievalModel
    from searchengine.config.settings import Settings

    from searchengine.search import SearchRequest, Searcher
    from searchengine.service import QueryService

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        words: list[str] = []
        for i, f in enumerate(photos(args.n)):
            shutil.copy(f, folder / f"{i:04d}_{f.name}")
            words += [w.lower() for w in re.split(r"[^A-Za-z]+", f.stem) if len(w) > 3]
        # Words from the file names, so that keyword and hybrid modes have matches to fuse.
        words = sorted(set(words))
        settings = Settings(data_dir=Path(tmp) / "data", model=str(model_dir("tiny")), captions=False,
                            refresh_interval_s=3600)
        model = RetrievalModel.load(settings.model, device="cpu")
        library = Library.open(settings, create=True)
        Indexer(model, library, settings).run([folder])
        count = [0]

        def counted(conn, cursor, statement, *rest) -> None:
            count[0] += 1
            if args.show:
                print("    " + " ".join(statement.split())[:160])

        event.listen(library.store.engine, "before_cursor_execute", counted)

        recompute = settings.model_copy(update={"itm_features": "recompute"})  # the GPU's way: no feature cache
        paths = {
            "service": QueryService(settings, model, library),
            "cli": Searcher(model, library, settings),
            "cli, ViT re-run": Searcher(model, library, recompute),
        }
        print(f"{args.n} photos; statements per fresh query (median over {args.repeat}), and median latency")
        for mode in ("semantic", "hybrid", "keyword"):
            for name, path in paths.items():
                counts, times = [], []
                for r in range(args.repeat):
                    query = PHRASES[r % len(PHRASES)].format(words[(7 * r) % len(words)])  # a fresh ranking each
                    count[0] = 0
                    t = time.perf_counter()
                    if name == "service":
                        asyncio.run(path.search_text(SearchRequest.checked(query, settings, k=10, mode=mode)))
                    else:
                        path.search(query, k=10, mode=mode)
                    times.append((time.perf_counter() - t) * 1000)
                    counts.append(count[0])
                print(f"{mode:9s} {name:16s} statements {statistics.median(counts):4.0f}   {statistics.median(times):7.1f} ms")
        library.close()


if __name__ == "__main__":
    main()
