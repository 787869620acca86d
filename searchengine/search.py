"""Text -> ITC candidates from FAISS -> ITM re-rank of the top n -> final score ITM + ITC.

This is the BLIP-2 paper's retrieval evaluation (LAVIS `compute_sim_matrix`): the ITC
max-sim score picks `k_candidates`, the ITM head re-scores the best `rerank` of them, and the
re-ranked ones come first, ordered by ITM + ITC. The rest keep their ITC order and score.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from searchengine.errors import BadImageError, QueryError
from searchengine.imageio import decode_image, read_file
from searchengine.library import Library, model_info
from searchengine.models import RetrievalModel
from searchengine.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Hit:
    image_id: int
    paths: list[str]
    itc: float
    itm: float | None
    score: float
    width: int
    height: int
    taken_at: str | None = None
    camera: str | None = None
    caption: str | None = None

    @property
    def path(self) -> str:
        return self.paths[0]


@dataclass
class SearchResult:
    query: str
    hits: list[Hit]
    reranked: int
    timings_ms: dict[str, float] = field(default_factory=dict)


class Searcher:
    def __init__(self, model: RetrievalModel, library: Library, settings: Settings) -> None:
        self.model = model
        self.library = library
        self.settings = settings
        library.bind(model_info(model))  # refuses an index built with another model
        mode = settings.itm_features
        self.use_cache = mode != "recompute"
        self.fill_cache = mode == "cache" or (mode == "auto" and not model.device.startswith("cuda"))

    def search(self, query: str, *, k: int = 10, k_candidates: int | None = None, rerank: int | None = None) -> SearchResult:
        text = self._check_query(query)
        if k < 1:
            raise QueryError("k must be at least 1")
        k_candidates = self.settings.k_candidates if k_candidates is None else k_candidates
        rerank = self.settings.rerank_top if rerank is None else rerank
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        text_vec = self.model.embed_texts([text])
        t1 = time.perf_counter()
        cands = self.library.index.search(text_vec, max(k, k_candidates))[0]
        t2 = time.perf_counter()
        timings["encode"] = (t1 - t0) * 1000
        timings["ann"] = (t2 - t1) * 1000

        ids, itc = cands.ids, cands.scores
        itm = np.full(len(ids), np.nan, dtype=np.float32)
        n = min(rerank, len(ids))
        if n:
            itm[:n] = self._itm(text, ids[:n])
        timings["rerank"] = (time.perf_counter() - t2) * 1000

        reranked = ~np.isnan(itm)
        final = np.where(reranked, itm + itc, itc)
        # Re-ranked candidates first (by ITM + ITC), then the rest by ITC, as in the paper.
        order = np.lexsort((-final, ~reranked))[:k]
        records = self.library.store.images([int(i) for i in ids[order]])
        hits = []
        for j in order:
            rec = records.get(int(ids[j]))
            if rec is None or not rec.paths:
                continue  # deleted between the ANN search and now
            hits.append(
                Hit(
                    image_id=rec.id,
                    paths=rec.paths,
                    itc=float(itc[j]),
                    itm=None if np.isnan(itm[j]) else float(itm[j]),
                    score=float(final[j]),
                    width=rec.width,
                    height=rec.height,
                    taken_at=rec.taken_at,
                    camera=rec.camera,
                    caption=rec.caption,
                )
            )
        timings["total"] = (time.perf_counter() - t0) * 1000
        return SearchResult(text, hits, int(reranked.sum()), timings)

    def _check_query(self, query: str) -> str:
        text = " ".join((query or "").split())
        if not text:
            raise QueryError("the query is empty: type some words that describe the picture")
        if len(text) > self.settings.max_query_chars:
            raise QueryError(f"the query is {len(text)} characters long; the limit is {self.settings.max_query_chars}")
        return text

    def _itm(self, text: str, ids: np.ndarray) -> np.ndarray:
        """ITM P(match) for each candidate; NaN where its features cannot be had."""
        import torch

        features: dict[int, np.ndarray] = {}
        cache = self.library.features if self.use_cache else None
        missing = []
        for image_id in ids.tolist():
            arr = cache.get(image_id) if cache is not None else None
            if arr is None:
                missing.append(image_id)
            else:
                features[image_id] = arr
        if missing:
            features.update(self._recompute_vit(missing))
        have = [i for i in ids.tolist() if i in features]
        out = np.full(len(ids), np.nan, dtype=np.float32)
        if not have:
            return out
        vit = torch.from_numpy(np.stack([np.asarray(features[i]) for i in have]))
        probs = self.model.itm(text, vit)
        pos = {image_id: j for j, image_id in enumerate(ids.tolist())}
        for image_id, p in zip(have, probs):
            out[pos[image_id]] = p
        return out

    def _recompute_vit(self, ids: list[int]) -> dict[int, np.ndarray]:
        records = self.library.store.images(ids)

        def load(image_id: int):
            rec = records.get(image_id)
            for path in rec.paths if rec else []:
                try:
                    return decode_image(read_file(path), max_pixels=self.settings.max_image_pixels).image
                except BadImageError as e:
                    log.warning("cannot re-rank %s: %s", path, e)
            return None

        with ThreadPoolExecutor(self.settings.decode_workers) as pool:
            loaded = list(zip(ids, pool.map(load, ids)))
        got = [image_id for image_id, im in loaded if im is not None]
        images = [im for _, im in loaded if im is not None]
        if not images:
            return {}
        vit = self.model.vit(self.model.preprocess(images))
        # Kept in the dtype the cache uses, so cached and recomputed candidates are scored alike.
        arrays = vit.float().cpu().numpy().astype(np.float16)
        out = dict(zip(got, arrays))
        if self.fill_cache and self.library.features is not None:
            for image_id, arr in out.items():
                self.library.features.put(image_id, arr)
        return out
