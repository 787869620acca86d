"""One Library per process, many writers: the indexer, a watcher and a server's queries (which
reconcile the vector index with the store) share it and never lose or duplicate a row."""

from __future__ import annotations

import pytest

import shutil
import threading

import numpy as np

from searchengine.indexing.pipeline import Indexer
from searchengine.indexing.watch import Watcher
from searchengine.library import Library
from tests.indexing.test_watch import wait_until


@pytest.mark.slow  # a live watcher beside an indexer and queries: real file-system events and waits
def test_an_indexer_a_watcher_and_queries_in_one_process_neither_lose_nor_duplicate(settings, model, tmp_path, photo_files):
    watched, indexed = tmp_path / "watched", tmp_path / "indexed"
    watched.mkdir(), indexed.mkdir()
    for i, f in enumerate(photo_files[:8]):
        shutil.copy(f, indexed / f"{i}{f.suffix}")
    settings = settings.model_copy(update={"batch_size": 1})  # many small commits: many chances to interleave
    library = Library.open(settings, create=True)
    stop = threading.Event()
    errors: list[BaseException] = []

    def queries() -> None:  # what the server does before every search
        while not stop.is_set():
            try:
                library.refresh()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    watcher = Watcher(Indexer(model, library, settings), [watched], poll=True, debounce_s=0.2, poll_interval_s=0.2)
    watcher.start()
    reader = threading.Thread(target=queries)
    reader.start()
    try:
        runner = threading.Thread(target=lambda: Indexer(model, library, settings).run([indexed]))
        runner.start()
        for i, f in enumerate(photo_files[8:14]):  # arrive while the indexer runs
            shutil.copy(f, watched / f"w{i}{f.suffix}")
        runner.join(120)
        expected = {str(p) for p in (*watched.iterdir(), *indexed.iterdir())}

        def settled() -> bool:
            have = library.catalog.files_under(str(tmp_path))
            return set(have) == expected and all(s.status == "indexed" for s in have.values())

        wait_until(settled, "every file of both folders indexed", timeout=120)
    finally:
        stop.set()
        reader.join(30)
        watcher.stop()
    try:
        assert not errors, errors
        store_ids = np.sort(library.store.image_ids())
        index_ids = library.index.ids()
        assert len(store_ids) == len({library.catalog.hashes_of([p])[p] for p in expected})  # one image per content
        assert np.array_equal(np.sort(index_ids), store_ids) and len(np.unique(index_ids)) == len(index_ids)
        assert library.index.index.ntotal == len(store_ids) * model.num_query_tokens  # no vectors twice
    finally:
        library.close()
