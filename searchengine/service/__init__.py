"""The query service: one model, one library, shared by every request of a long-running server.

It adds what a single CLI query does not need:
- model calls are serialised by one lock (torch already uses every core for one call);
- concurrent text queries share encoder calls through the micro-batcher;
- rankings are kept (LRU, keyed by query, options and store revision), so every page of a
  query comes from the same ranking: pages neither overlap nor skip, and deep pages cost a
  slice, not a new re-rank;
- writes by an indexer in another process are picked up (store revision -> reconcile).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar
import io
import os
import threading
import time

from PIL import Image

from searchengine.util.batcher import MicroBatcher
from searchengine.search.duplicates import Duplicates
from searchengine.errors import (
    BadImageError, ImageNotFoundError, IndexedFileError, IndexedFileGone, ServiceBusy, UploadError, UploadTooLarge,
)
from searchengine.media.imageio import decode_image
from searchengine.media.indexed_file import IndexedFileOpener, OpenedFile
from searchengine.library import ImageDetail, Library
from searchengine.util.metrics import Metrics
from searchengine.models.retrieval import RetrievalModel
from searchengine.search import Filters, Page, RankingCache, Searcher, SearchRequest
from searchengine.config.settings import Settings
from searchengine.store.records import FolderCount
from searchengine.models.conversation import Decoding, Turn, check_turns, fit
from searchengine.models.vqa import ANSWER_TOKENS, Answer, LazyAnswerer, check_question
from searchengine.media import heatmap
from searchengine.models.explain import HeatMap
from searchengine.search.itm import ItmFeatures
from searchengine.search.request import check_query

T = TypeVar("T")


@dataclass
class Explained:
    """Where a query matches an image (`QueryService.explain`)."""

    image_id: int | None  # None: an upload
    query: str
    heat: HeatMap
    timings_ms: dict[str, float]
    png: bytes | None = None  # the map over the photo, where asked for

log = logging.getLogger(__name__)


@contextmanager
def _indexed_file_errors() -> Iterator[None]:
    """An indexed image's file that cannot be made into a thumbnail or preview: gone (404), or
    there but no longer an image (409); never "the upload is not a usable image"."""
    try:
        yield
    except BadImageError as e:
        if e.reason == "vanished":
            raise IndexedFileGone(f"the image's file is gone: {e}") from e
        raise IndexedFileError(f"the image's file cannot be read any more ({e}); re-index its folder") from e


def release_memory() -> None:
    """Give freed heap back to the system (glibc keeps it otherwise, and a burst of large
    decodes would leave the process that much bigger for good)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class LockedModel:
    """The model with its compute methods under one lock, for use from many threads."""

    _LOCKED = {"embed_texts", "embed_pixels", "embed_images", "itm", "vit", "explain"}

    def __init__(self, model: RetrievalModel) -> None:
        self._model = model
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        attr = getattr(self._model, name)
        if name not in self._LOCKED:
            return attr

        def locked(*args, **kwargs):
            with self._lock:
                return attr(*args, **kwargs)

        return locked


class QueryService:
    def __init__(
        self, settings: Settings, model: RetrievalModel, library: Library, metrics: Metrics | None = None,
        answerer: LazyAnswerer | None = None, load_model: Callable[[str], RetrievalModel] | None = None,
    ) -> None:
        self.settings = settings
        # How a model named by the index is loaded when a re-index switched it (the composition
        # root passes it in; without one, the service keeps the model it was given).
        self.load_model = load_model
        self.answerer = answerer or LazyAnswerer(None, "this server answers no questions about photos", None)
        self.library = library
        self.opener = IndexedFileOpener(library.inside)  # originals are served as opened and checked
        self.metrics = metrics or Metrics()
        self.model = LockedModel(model)
        self.searcher = Searcher(self.model, library, settings)
        self.batcher: MicroBatcher[str] = MicroBatcher(
            lambda texts: self.model.embed_texts(texts),  # the model in use (a re-index switches it)
            max_batch=settings.text_batch_max,
            max_wait_ms=settings.text_batch_wait_ms,
            on_batch=lambda size, seconds: self.metrics.batch_size.observe(size),
        )
        self.rankings = RankingCache(settings.ranking_cache_size)
        self._upload_turn = asyncio.Semaphore(settings.upload_decodes)
        self._upload_waiting = 0
        self._refresh_lock = threading.Lock()
        self._last_refresh = time.monotonic()
        self._next_model: threading.Thread | None = None  # loading the model a re-index switched to
        self._loaded: RetrievalModel | None = None
        self._folders: tuple[int, list[FolderCount]] | None = None  # (library revision, folders)
        self._folders_lock = threading.Lock()
        self._duplicates: tuple[tuple[int, float], Duplicates] | None = None  # ((revision, threshold), groups)
        self._duplicates_lock = threading.Lock()
        self._facets: dict[tuple[int, Filters], dict[str, list[tuple[str, int]]]] = {}
        self._facets_lock = threading.Lock()

    async def close(self) -> None:
        await self.batcher.close()

    # -- keeping up with the indexer -------------------------------------------------------

    def refresh(self, force: bool = False) -> None:
        """Reconcile with the store when another process has written to it."""
        now = time.monotonic()
        if not force and now - self._last_refresh < self.settings.refresh_interval_s:
            return
        with self._refresh_lock:
            self._last_refresh = now
            if self._waiting_for_new_model():
                return
            report = self.library.refresh()
        if report is not None:
            self.rankings.clear()

    def _waiting_for_new_model(self) -> bool:
        """After another process re-indexed the library with another model: True while that
        model loads (in the background; searches go on with the old model and the old vector
        index in memory, which agree with each other), then it is switched to and False."""
        if not self.library.model_changed():
            return False
        if self._loaded is None:
            if self.load_model is None:  # nothing to load it with: the old model and index answer on
                return True
            if self._next_model is None or not self._next_model.is_alive():
                name = self.library.built_with().model.name
                log.warning("the index was re-indexed with %s: loading it; searches use the old model until then", name)
                self._next_model = threading.Thread(target=self._load, args=(name,), name="load-model", daemon=True)
                self._next_model.start()
            return True
        new, self._loaded, self._next_model = self._loaded, None, None
        self.model = LockedModel(new)
        self.searcher = Searcher(self.model, self.library, self.settings)
        self.rankings.clear()
        log.warning("switched to the model the index was re-indexed with: %s", new.name)
        return False

    def _load(self, name: str) -> None:
        try:
            self._loaded = self.load_model(name)
        except Exception as e:  # noqa: BLE001 - the old model serves on; the next refresh tries again
            log.error("cannot load %s, the model the index was re-indexed with: %s", name, e)

    # -- searches ---------------------------------------------------------------------------
    # Each is the Searcher's one path, in a worker thread, with the service's parts plugged in:
    # the micro-batcher encodes texts, the ranking cache keeps rankings across pages.

    async def search_text(self, request: SearchRequest) -> Page:
        """A text query, checked where it came in (the route builds the request)."""
        await asyncio.to_thread(self.refresh)
        loop = asyncio.get_running_loop()

        def encode(text: str):
            return asyncio.run_coroutine_threadsafe(self.batcher.submit(text), loop).result()

        page = await asyncio.to_thread(self.searcher.run, request, encode=encode, rankings=self.rankings)
        return self._observed(page)

    async def search_image(
        self, data: bytes, *, k: int, offset: int, min_score: float | None, filters: Filters
    ) -> Page:
        """Images like an uploaded one."""
        await asyncio.to_thread(self.refresh)
        await asyncio.to_thread(self.searcher.check_filters, filters)  # before the model's work
        t0 = time.perf_counter()
        vectors = await self._embed_upload(data)
        encode = (time.perf_counter() - t0) * 1000
        page = await asyncio.to_thread(
            self.searcher.search_image, vectors=vectors, k=k, offset=offset, filters=filters, min_score=min_score
        )
        page.timings_ms["encode"] = encode
        page.timings_ms["total"] += encode
        return self._observed(page)

    async def _embed_upload(self, data: bytes):
        """An upload's ITC vectors."""

        def embed(image: Image.Image):
            # Straight to the model's input size, with the bicubic filter its processor uses:
            # the processor would otherwise turn the full-size image into float arrays first
            # (a 49 MP upload: ~600 MiB more).
            size = self.model.image_size
            return self.model.embed_images([image.resize((size, size), Image.Resampling.BICUBIC)]).itc[0]

        return await self._with_upload(data, embed, draft=2 * self.model.image_size)

    async def _with_upload(self, data: bytes, work: Callable[[Image.Image], T], *, draft: int) -> T:
        """`work(image)` on an upload's decoded image, in a thread. Decodes take turns (a 49 MP
        PNG costs ~330 MiB while it decodes): at most `upload_decodes` at once, at most
        `upload_queue` waiting, and past that a 503 with Retry-After rather than memory that
        grows with the burst. JPEGs are decoded at a reduced DCT scale (`draft`, the pixels
        the work needs); freed memory goes back to the system afterwards."""
        if self._upload_turn.locked() and self._upload_waiting >= self.settings.upload_queue:
            raise ServiceBusy("too many images are being searched by at the moment; try again in a few seconds")
        self._upload_waiting += 1
        try:
            await self._upload_turn.acquire()
        finally:
            self._upload_waiting -= 1
        try:
            try:
                image = (await asyncio.to_thread(
                    decode_image, data, max_pixels=self.settings.max_upload_pixels,
                    limit_hint="the server takes uploads up to this size; send a smaller image", draft=draft,
                )).image
            except BadImageError as e:
                if e.reason == "too_large":  # more pixels than the server takes
                    raise UploadTooLarge(str(e)) from e
                raise UploadError(f"the upload is not a usable image: {e}") from e
            result = await asyncio.to_thread(work, image)
            del image
        finally:
            self._upload_turn.release()
            await asyncio.to_thread(release_memory)
        return result

    async def similar(
        self, image_id: int, *, k: int, offset: int, min_score: float | None, filters: Filters
    ) -> Page:
        """Images like an indexed one (itself left out), from its stored vectors: no model call."""
        await asyncio.to_thread(self.refresh)
        page = await asyncio.to_thread(
            self.searcher.similar, image_id, k=k, offset=offset, filters=filters, min_score=min_score,
            rankings=self.rankings,
        )
        return self._observed(page)

    def _observed(self, page: Page) -> Page:
        """The page, its stage timings recorded in the metrics when this request computed them."""
        if page.fresh:
            t = page.timings_ms
            stages = ("encode", "ann", "rerank") if t.get("encode") else ("ann", "rerank")  # similar: no model
            for stage in stages:
                self.metrics.stage.labels(stage).observe(t.get(stage, 0.0) / 1000)
        return page

    # -- images -----------------------------------------------------------------------------

    def image(self, image_id: int) -> ImageDetail:
        detail = self.library.catalog.image_detail(image_id)
        if detail is None or not detail.files:
            raise ImageNotFoundError(f"no image has id {image_id}")
        return detail

    def thumbnail(self, image_id: int) -> bytes:
        # Made from the indexed content (at index time, or below from a checked read): served
        # while the image still has a file inside the library, as its original would be.
        self._open_indexed(image_id, content=False).close()
        with _indexed_file_errors():
            return self.library.thumbnail(image_id, lambda: self._read_indexed(image_id))

    def preview(self, image_id: int) -> bytes:
        """A screen-sized JPEG of the image for the detail view, made on first request."""
        self._open_indexed(image_id, content=False).close()
        with _indexed_file_errors():
            return self.library.preview(image_id, lambda: self._read_indexed(image_id))

    def _open_indexed(self, image_id: int, *, content: bool = True) -> OpenedFile:
        """The image's first file that is still, provably, the indexed content, open: checked on
        the open descriptor (regular, size and mtime, real path inside the library under its
        link policy, content hash), so a link flipped after the check cannot change what is
        read (searchengine/media/indexed_file.py)."""
        detail = self.image(image_id)
        return self.opener.open(image_id, detail.files, detail.sha256, content=content)

    def _read_indexed(self, image_id: int) -> bytes:
        with self._open_indexed(image_id) as f:
            return f.read()

    def folders(self, contains: str = "", limit: int = 50) -> tuple[list[FolderCount], int]:
        """Indexed folders (subfolders included) whose path contains `contains` (any case),
        those whose own name contains it first, then by path; and how many matched in all."""
        self.refresh()
        revision = self.library.revision
        with self._folders_lock:
            if self._folders is None or self._folders[0] != revision:
                # Derived from every file's path: kept until the library changes, as the UI
                # asks again on every keystroke.
                self._folders = (revision, self.library.catalog.folders())
            every = self._folders[1]
        needle = contains.strip().casefold()
        found = [f for f in every if needle in f.path.casefold()]
        if needle:
            found.sort(key=lambda f: (needle not in os.path.basename(f.path).casefold(), f.path))
        return found[:limit], len(found)

    def facets(self, filters: Filters) -> dict[str, list[tuple[str, int]]]:
        """Image counts per camera, lens, file type and orientation, kept until the library
        changes (the filter panel asks on every change of a filter)."""
        self.refresh()
        self.searcher.check_filters(filters)
        key = (self.library.revision, filters)
        with self._facets_lock:
            if key in self._facets:
                return self._facets[key]
        found = self.library.catalog.facets(filters)
        with self._facets_lock:
            if len(self._facets) >= 64 or any(k[0] != key[0] for k in self._facets):
                self._facets.clear()
            self._facets[key] = found
        return found

    def duplicates(self, threshold: float) -> Duplicates:
        """Near-duplicate groups (see duplicates.py), kept until the library changes: the UI
        pages through them, and finding them reads every image's vectors."""
        from searchengine.search.duplicates import check_threshold, find_duplicates

        threshold = check_threshold(threshold)
        self.refresh()
        key = (self.library.revision, threshold)
        with self._duplicates_lock:  # one search at a time; the others wait for its result
            if self._duplicates is None or self._duplicates[0] != key:
                self._duplicates = (key, find_duplicates(self.library, threshold))
            return self._duplicates[1]

    def ask(self, image_id: int, question: str) -> Answer:
        """The VQA model's answer to a question about an indexed image (loaded on first use)."""
        return self.chat(image_id, [], check_question(question), Decoding(max_new_tokens=ANSWER_TOKENS))

    def chat(self, image_id: int, turns: list[Turn], question: str, decoding: Decoding) -> Answer:
        """The answer to `question` about an indexed image after the earlier `turns` (the
        server keeps no conversation: the client sends it back each time)."""
        answerer, image, read_ms = self._for_answer(image_id, turns, question, decoding)
        answer = answerer.chat(image, turns, question, decoding)
        answer.timings_ms = {"read": read_ms, **answer.timings_ms}
        answer.timings_ms["total"] = sum(answer.timings_ms.values())
        return answer

    def chat_stream(self, image_id: int, turns: list[Turn], question: str, decoding: Decoding) -> tuple[str, int, Iterator[str]]:
        """(the model's name, how many turns the prompt keeps, the answer's pieces as they are
        generated). Everything that can be refused is refused here, before the first piece."""
        answerer, image, _ = self._for_answer(image_id, turns, question, decoding)
        kept = fit(turns, question, answerer.prompt_tokens, answerer.prompt_budget(decoding))[1]
        return answerer.name, kept, answerer.stream(image, turns, question, decoding)

    def _for_answer(self, image_id: int, turns: list[Turn], question: str, decoding: Decoding):
        """(the answerer, the image, ms to read it), the request checked first."""
        check_question(question)
        check_turns(turns, check_question)
        decoding.checked()
        answerer = self.answerer.get()  # VqaUnavailable: why none can answer
        t0 = time.perf_counter()
        data = self._read_indexed(image_id)
        with _indexed_file_errors():
            image = decode_image(data, max_pixels=self.settings.max_image_pixels, draft=2 * answerer.image_side).image
        return answerer, image, (time.perf_counter() - t0) * 1000

    # -- where a query matches ----------------------------------------------------------------

    def explain(self, image_id: int, query: str, *, overlay: bool = False) -> Explained:
        """Where `query` matches an indexed image: Grad-CAM over ITM (models/explain.py), from
        the ViT output re-ranking scores it with; with `overlay`, drawn over its preview too."""
        query = check_query(query, self.settings.max_query_chars)
        t0 = time.perf_counter()
        model = self.model  # one model for the features and the map (a re-index may switch it)
        features = ItmFeatures(model, self.library, self.settings).get([image_id], {})
        if image_id not in features:
            self._open_indexed(image_id).close()  # why not: no such image, or its file is gone
            raise IndexedFileError(f"image {image_id}'s file cannot be read any more; re-index its folder")
        t1 = time.perf_counter()
        heat = model.explain(query, features[image_id])
        timings = {"features": (t1 - t0) * 1000, "explain": (time.perf_counter() - t1) * 1000}
        png = None
        if overlay:
            t2 = time.perf_counter()
            png = heatmap.overlay(Image.open(io.BytesIO(self.preview(image_id))), heat.grid)
            timings["overlay"] = (time.perf_counter() - t2) * 1000
        return Explained(image_id, query, heat, timings, png)

    async def explain_upload(self, data: bytes, query: str) -> Explained:
        """Where `query` matches an uploaded image, with the map drawn over it (longest side
        `preview_size`); decodes take turns as searches by an upload do."""
        query = check_query(query, self.settings.max_query_chars)

        model = self.model  # one model for the ViT and the map (a re-index may switch it)

        def work(image: Image.Image) -> Explained:
            t0 = time.perf_counter()
            size = model.image_size
            vit = model.vit(model.preprocess([image.resize((size, size), Image.Resampling.BICUBIC)]))
            heat = model.explain(query, vit)
            image.thumbnail((self.settings.preview_size, self.settings.preview_size), Image.Resampling.LANCZOS)
            png = heatmap.overlay(image, heat.grid)
            return Explained(None, query, heat, {"explain": (time.perf_counter() - t0) * 1000}, png)

        return await self._with_upload(data, work, draft=self.settings.preview_size)

    def file(self, image_id: int) -> OpenedFile:
        """The image's first file that is still the indexed content, open (the caller closes
        it); never a path from the request."""
        return self._open_indexed(image_id)

    def update_gauges(self) -> None:
        images, vectors = self.library.counts()
        self.metrics.vectors.set(vectors)
        self.metrics.images.set(images)

