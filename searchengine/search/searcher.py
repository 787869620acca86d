"""Text queries in three modes, and image queries.

- semantic: the BLIP-2 paper's retrieval evaluation (LAVIS `compute_sim_matrix`): the ITC
  max-sim score picks `k_candidates` from FAISS, the ITM head re-scores the best `rerank` of
  them, and the re-ranked ones come first, ordered by ITM + ITC. The rest keep their ITC
  order and score.
- keyword: the full-text index over captions and path words; images matching more of the
  query's words first (score: the share matched), then by BM25. No ITM; the ITC score is
  reported but takes no part in the order.
- hybrid (the default): the semantic candidates and the keyword matches are fused by
  reciprocal rank fusion; ITM re-ranks the fused top `rerank`. Every candidate's score is its
  semantic score (ITM + ITC where re-ranked, else ITC) plus its keyword score (the share of
  the query's words it matches, 0 to 1); re-ranked ones first, as in semantic mode.
`-word` exclusions leave matching images out in every mode (see `searchengine.media.keywords`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from searchengine.config.settings import Settings
from searchengine.errors import ImageNotFoundError, QueryError
from searchengine.library import Library, model_info
from searchengine.media.keywords import KeywordQuery
from searchengine.models.retrieval import RetrievalModel
from searchengine.search.itm import ItmFeatures
from searchengine.search.ranking import Hit, Page, Pool, Ranking, RankingCache, image_similarity, rrf
from searchengine.search.request import Filters, SearchRequest, Steer, check_filters, check_page

if TYPE_CHECKING:
    from PIL import Image

    from searchengine.store.records import ImageRecord


@dataclass(frozen=True)
class Window:
    """Which hits of an image query's ranking a page shows (what a `SearchRequest` says of its
    page; an image query has no text and no ITM threshold)."""

    k: int
    offset: int
    min_score: float | None = None
    min_itm: None = None
    text: None = None


class Searcher:
    """Ranks a library. `model` None: keyword mode only (no model loaded, no ITC scores)."""

    def __init__(self, model: RetrievalModel | None, library: Library, settings: Settings) -> None:
        self.model = model
        self.library = library
        self.settings = settings
        if model is not None:
            library.use_model(model_info(model), model.former_fingerprints)  # refuses an index built with another model
        self.itm_features = ItmFeatures(model, library, settings) if model is not None else None

    def check_filters(self, filters: Filters | None) -> None:
        check_filters(self.library, filters)

    def _rerank_depth(self, mode: str, rerank: int | None, semantic_words: bool = True) -> int:
        """How many candidates ITM re-scores: none in keyword mode or with no words for the
        semantic side, else the request's number, else the `rerank_top` setting."""
        if mode == "keyword" or not semantic_words:
            return 0
        return self.settings.rerank_top if rerank is None else rerank

    def allowed_ids(self, filters: Filters | None, excluded: np.ndarray | None = None) -> np.ndarray | None:
        allowed = None
        if filters is not None and filters.active:
            allowed = self.library.catalog.filter_ids(filters)
        if excluded is not None and len(excluded):
            if allowed is None:
                allowed = self.library.indexed_ids()
            allowed = np.setdiff1d(allowed, excluded)
        return allowed

    def _itc_exact(self, text_vec: np.ndarray, ids: np.ndarray) -> dict[int, float]:
        """ITC (max over the image's vectors) of images given by id: an exact search of the
        vector index restricted to them (no store query)."""
        found = self.library.search_vectors(text_vec[None], len(ids), ids)[0]
        return dict(zip(found.ids.tolist(), found.scores.tolist()))

    def rank_text(
        self,
        kq: KeywordQuery,
        text_vec: np.ndarray | None,
        *,
        mode: str,
        depth: int,
        rerank: int | None = None,
        filters: Filters | None = None,
        known_itm: dict[int, float] | None = None,
        exclude_ids: np.ndarray | None = None,
    ) -> Ranking:
        """The best `depth` images for a query read by `parse_for_mode(text, mode)`, whose
        `semantic_text` encodes to `text_vec` (None in keyword mode without a model: no ITC).

        Each mode gathers its candidates its own way (`_semantic_pool`, `_keyword_pool`,
        `_hybrid_pool`); ITM then re-scores the first `rerank` of them (`_rerank`).
        `known_itm`: ITM scores from a shallower ranking of the same query, reused rather than
        recomputed when a deeper page needs a deeper ranking (the re-ranked top is the same).
        """
        rerank = self._rerank_depth(mode, rerank)
        filters = filters or Filters()
        t0 = time.perf_counter()
        excluded = self.library.catalog.keyword_matches(kq.excluded) if kq.excluded else None
        if exclude_ids is not None and len(exclude_ids):  # unliked examples
            excluded = exclude_ids if excluded is None else np.union1d(excluded, exclude_ids)
        if mode == "semantic":
            pool = self._semantic_pool(text_vec, depth, filters, excluded)
        elif mode == "keyword":
            pool = self._keyword_pool(kq, text_vec, depth, filters)
        else:
            pool = self._hybrid_pool(kq, text_vec, depth, filters, excluded)
        t1 = time.perf_counter()
        ranking = self._rerank(pool, kq.semantic_text, mode=mode, rerank=rerank, depth=depth, known_itm=known_itm or {})
        ranking.timings = {"ann": (t1 - t0) * 1000, "rerank": (time.perf_counter() - t1) * 1000}
        ranking.query_vector = text_vec
        return ranking

    def _semantic_pool(self, text_vec: np.ndarray, depth: int, filters: Filters, excluded: np.ndarray | None) -> Pool:
        """The top `depth` images by ITC (max over each image's vectors), within the filters."""
        found = self.library.search_vectors(text_vec[None], depth, self.allowed_ids(filters, excluded))[0]
        return Pool(found.ids, found.scores.astype(np.float32), np.full(len(found.ids), np.nan, np.float32), len(found.ids) < depth)

    def _keyword_pool(self, kq: KeywordQuery, text_vec: np.ndarray | None, depth: int, filters: Filters) -> Pool:
        """The top `depth` images by share of the query's words matched, then BM25; with their
        ITC where the query was encoded (keyword mode still shows it)."""
        hits = self.library.catalog.keyword_search(kq, depth, filters) if kq.searchable else []
        ids = np.array([h.image_id for h in hits], dtype=np.int64)
        if text_vec is None:
            itc_of = {i: np.nan for i in ids.tolist()}
        else:
            itc_of = self._itc_exact(text_vec, ids) if len(ids) else {}
        keep = [j for j, i in enumerate(ids.tolist()) if i in itc_of]  # deleted meanwhile
        return Pool(
            ids[keep], np.array([itc_of[int(i)] for i in ids[keep]], np.float32),
            np.array([hits[j].coverage for j in keep], np.float32), len(hits) < depth,
        )

    def _hybrid_pool(
        self, kq: KeywordQuery, text_vec: np.ndarray, depth: int, filters: Filters, excluded: np.ndarray | None
    ) -> Pool:
        """Semantic and keyword candidates fused by reciprocal rank: the fused order decides
        which candidates ITM re-ranks."""
        semantic = self._semantic_pool(text_vec, depth, filters, excluded)
        hits = self.library.catalog.keyword_search(kq, depth, filters) if kq.searchable else []
        # Images that match only words the whole library shares (coverage 0) are no keyword
        # evidence: fusing them would hand ITM slots to an arbitrary list (a library under
        # ~/Pictures and the query "a picture of a dog").
        left_out = set(excluded.tolist()) if excluded is not None else set()  # -word matches, unliked examples
        useful = [h for h in hits if h.coverage > 0 and h.image_id not in left_out]
        kw_ids = np.array([h.image_id for h in useful], dtype=np.int64)
        coverage = {h.image_id: h.coverage for h in useful}
        itc_of = dict(zip(semantic.ids.tolist(), semantic.itc.tolist()))
        missing = np.array([i for i in kw_ids.tolist() if i not in itc_of], dtype=np.int64)
        if len(missing):
            itc_of.update(self._itc_exact(text_vec, missing))
        fused = rrf([semantic.ids, kw_ids], self.settings.rrf_k)
        ids = [i for i in sorted(fused, key=lambda i: (-fused[i], i)) if i in itc_of]  # deleted meanwhile
        return Pool(
            np.array(ids, dtype=np.int64), np.array([itc_of[i] for i in ids], np.float32),
            np.array([coverage.get(i, np.nan) for i in ids], np.float32), semantic.exhausted and len(kw_ids) < depth,
        )

    def _rerank(self, pool: Pool, text: str, *, mode: str, rerank: int, depth: int, known_itm: dict[int, float]) -> Ranking:
        """ITM for the pool's first `rerank` candidates (reusing `known_itm`), and the final
        order: re-ranked candidates first by ITM + ITC (+ keyword share in hybrid mode), then
        the rest by ITC, as in the paper; keyword mode keeps its own order."""
        ids, itc, kw = pool.ids, pool.itc, pool.keyword
        itm = np.full(len(ids), np.nan, dtype=np.float32)
        n = min(rerank, len(ids))
        todo = [j for j in range(n) if int(ids[j]) not in known_itm]
        for j in range(n):
            itm[j] = known_itm.get(int(ids[j]), np.nan)
        records: dict[int, ImageRecord] = {}
        if todo:
            itm[todo] = self._itm(text, ids[todo], records)
        reranked = ~np.isnan(itm)
        if mode == "keyword":
            final = kw
            order = np.arange(len(ids))  # already by share of words matched, then BM25
        else:
            final = np.where(reranked, itm + itc, itc) + (np.nan_to_num(kw) if mode == "hybrid" else 0.0)
            order = np.lexsort((ids, -final, ~reranked))
        ranking = Ranking(ids[order], itc[order], itm[order], final[order].astype(np.float32), depth, pool.exhausted, {})
        ranking.keyword = kw[order]
        ranking.records = records
        return ranking

    def search(
        self,
        query: str,
        *,
        k: int = 10,
        offset: int = 0,
        rerank: int | None = None,
        filters: Filters | None = None,
        min_score: float | None = None,
        min_itm: float | None = None,
        mode: str | None = None,
        steer: Steer | None = None,
        encode: Callable[[str], np.ndarray] | None = None,
        rankings: "RankingCache | None" = None,
    ) -> Page:
        """A text query, start to end (`run` of a `SearchRequest.checked` from these).

        `steer`: example images liked and unliked (combined queries, see `Steer`); with liked
        examples the words may be left out (then the ranking is ITC alone: ITM needs words).
        `min_itm`: keep only re-ranked hits whose ITM P(match) reaches it ("only matches").
        `encode` and `rankings`: see `run`.
        """
        request = SearchRequest.checked(
            query, self.settings, k=k, offset=offset, rerank=rerank, filters=filters, min_score=min_score,
            min_itm=min_itm, mode=mode, steer=steer,
        )
        return self.run(request, encode=encode, rankings=rankings)

    def run(
        self, request: SearchRequest, *, encode: Callable[[str], np.ndarray] | None = None,
        rankings: "RankingCache | None" = None,
    ) -> Page:
        """A checked text query, start to end: the one path of the CLI, the service and eval.
        `encode`: how the query's text becomes its vector (default: the model, directly; the
        service passes its micro-batcher). `rankings`: rankings kept across requests (the
        service's), so that the next page of a query costs no model call, and a deeper one
        re-uses the ITM scores it has."""
        r = request
        text, kq, mode, steer, filters = r.text, r.keywords, r.mode, r.steer, r.filters
        t0 = time.perf_counter()
        depth = max(r.offset + r.k, self.settings.k_candidates)
        rerank = self._rerank_depth(mode, r.rerank, bool(kq.semantic_text))
        key = ("text", text, mode, rerank, filters, steer, self.library.revision)
        ranking, shallower = rankings.get(key, depth) if rankings is not None else (None, None)
        if ranking is not None:
            return self._page(ranking, r, t0, 0.0, fresh=False)
        self.check_filters(filters)
        if self.model is None and mode != "keyword":
            raise QueryError(f"{mode} search needs the model; only keyword search runs without it")
        known = None
        itc_first = None
        if shallower is None and rankings is not None and rerank:
            # The same query asked without re-ranking first (results that sharpen: the UI shows
            # the ITC order at once, then asks for this): its vector is not encoded again.
            itc_first, _ = rankings.get(("text", text, mode, 0, filters, steer, self.library.revision), 1)
        if shallower is not None and shallower.query_vector is not None:
            text_vec, known = shallower.query_vector, shallower.itm_by_id()  # a deeper page
        elif itc_first is not None and itc_first.query_vector is not None:
            text_vec, known = itc_first.query_vector, {}
        elif self.model is not None:
            # Keyword mode ranks by words alone; the query is encoded only for the ITC column.
            text_vec = (encode or self._encode)(kq.semantic_text) if kq.semantic_text else None
            if steer.active:
                text_vec = self.steered_vector(text_vec, steer)
        else:
            text_vec = None
        encode_ms = (time.perf_counter() - t0) * 1000 if known is None and text_vec is not None else 0.0
        excluded = np.array(sorted(i for i, _ in steer.unlike), dtype=np.int64)
        ranking = self.rank_text(
            kq, text_vec, mode=mode, depth=depth, rerank=rerank, filters=filters, known_itm=known, exclude_ids=excluded
        )
        if shallower is not None:
            ranking = ranking.after(shallower)
        if rankings is not None:
            rankings.keep(key, ranking)
        return self._page(ranking, r, t0, encode_ms, fresh=True)

    def steered_vector(self, text_vec: np.ndarray | None, steer: Steer) -> np.ndarray:
        """The combined query vector of `Steer`'s formula; QueryError naming an example image
        that is not in the index."""
        total = np.zeros(self.model.embed_dim if text_vec is None else text_vec.shape[-1], np.float64)
        if text_vec is not None:
            total += text_vec
        stored: dict[int, np.ndarray] = {}
        for ids, vectors in self.library.catalog.iter_vectors([i for i, _ in steer.like + steer.unlike]):  # one read
            stored.update(zip(ids.tolist(), vectors))
        for examples, sign, what in ((steer.like, 1.0, "liked"), (steer.unlike, -1.0, "unliked")):
            for image_id, weight in examples:
                if image_id not in stored:
                    raise ImageNotFoundError(f"the {what} example image {image_id} is not in the index")
                mean = stored[image_id].astype(np.float64).mean(axis=0)
                total += sign * weight * mean / max(np.linalg.norm(mean), 1e-12)
        norm = np.linalg.norm(total)
        if norm < 1e-6:
            raise QueryError("the liked and unliked examples cancel out: there is nothing left to look for")
        return (total / norm).astype(np.float32)

    def _encode(self, text: str) -> np.ndarray:
        return self.model.embed_texts([text])[0]

    def _page(self, ranking: Ranking, request: "SearchRequest | Window", t0: float, encode_ms: float, *, fresh: bool) -> Page:
        """A page of a ranking, timed: `fresh` when this request computed the ranking (a kept
        one cost it nothing)."""
        min_itm = request.min_itm
        hits, has_more = self.page(ranking, request.offset, request.k, request.min_score, min_itm)
        timings = {"encode": encode_ms, "ann": 0.0, "rerank": 0.0}
        if fresh:
            timings.update(ranking.timings)
        timings["total"] = (time.perf_counter() - t0) * 1000
        strong = None
        if ranking.reranked:
            threshold = self.settings.strong_match if min_itm is None else min_itm
            strong = int((np.nan_to_num(ranking.itm, nan=-1.0) >= threshold).sum())
        return Page(hits, has_more, ranking.reranked, timings, request.text, fresh, strong)

    def search_image(
        self,
        image: "Image.Image | None" = None,
        *,
        vectors: np.ndarray | None = None,
        k: int = 10,
        offset: int = 0,
        filters: Filters | None = None,
        min_score: float | None = None,
    ) -> Page:
        """Images like an example image, or like the ITC vectors [Q, D] of one (the service
        embeds its uploads itself, taking turns): the one path of the CLI and the service."""
        check_page(k, offset)
        if self.model is None:
            raise QueryError("search by example image needs the model")
        self.check_filters(filters)  # before the model's work
        t0 = time.perf_counter()
        if vectors is None:
            vectors = self.model.embed_images([image]).itc[0]
        encode_ms = (time.perf_counter() - t0) * 1000
        ranking = self.rank_image(vectors, depth=max(offset + k, self.settings.k_candidates), filters=filters)
        return self._page(ranking, Window(k, offset, min_score), t0, encode_ms, fresh=True)

    def similar(
        self,
        image_id: int,
        *,
        k: int = 10,
        offset: int = 0,
        filters: Filters | None = None,
        min_score: float | None = None,
        rankings: "RankingCache | None" = None,
    ) -> Page:
        """Images like an indexed one (itself left out), from its stored vectors: no model call."""
        t0 = time.perf_counter()
        depth = max(offset + k, self.settings.k_candidates)
        key = ("similar", image_id, filters, self.library.revision)
        ranking, _ = rankings.get(key, depth) if rankings is not None else (None, None)
        if ranking is not None:
            return self._page(ranking, Window(k, offset, min_score), t0, 0.0, fresh=False)
        self.check_filters(filters)
        vectors = self.library.vectors_of(image_id)
        if vectors is None:
            raise ImageNotFoundError(f"no image has id {image_id}")
        ranking = self.rank_image(vectors, depth=depth, filters=filters, exclude=image_id)
        if rankings is not None:
            rankings.keep(key, ranking)
        return self._page(ranking, Window(k, offset, min_score), t0, 0.0, fresh=True)

    def rank_image(
        self, vectors: np.ndarray, *, depth: int, filters: Filters | None = None, exclude: int | None = None
    ) -> Ranking:
        """Images most like one given by its ITC vectors [Q, D], by `image_similarity`.

        Candidates: the union of each query vector's top `depth` images (FAISS), cut to the
        4*depth with the best summed per-vector scores; each is then scored exactly from its
        stored vectors. Exact whenever the union holds the whole library.
        """
        t0 = time.perf_counter()
        allowed = self.allowed_ids(filters)
        # Each candidate is re-scored below: the approximate tier's own scores serve to choose them.
        per_vector = self.library.search_vectors(vectors, depth + 1, allowed, exact_scores=False)
        summed: dict[int, float] = {}
        for cands in per_vector:
            for image_id, score in zip(cands.ids.tolist(), cands.scores.tolist()):
                summed[image_id] = summed.get(image_id, 0.0) + score
        summed.pop(exclude, None)
        pool = sorted(summed, key=summed.__getitem__, reverse=True)[: 4 * depth]
        ids_list, scores_list = [], []
        for ids, stored in self.library.catalog.iter_vectors(pool):
            ids_list.append(ids)
            scores_list.append(image_similarity(vectors, stored))
        t1 = time.perf_counter()
        if not ids_list:
            empty = np.zeros(0, np.float32)
            return Ranking(np.zeros(0, np.int64), empty, empty, empty, depth, True, {"ann": (t1 - t0) * 1000, "rerank": 0.0})
        ids, scores = np.concatenate(ids_list), np.concatenate(scores_list)
        order = np.lexsort((ids, -scores))[:depth]
        nan = np.full(len(order), np.nan, dtype=np.float32)
        return Ranking(ids[order], scores[order], nan, scores[order], depth, len(pool) < depth, {"ann": (t1 - t0) * 1000, "rerank": 0.0})

    def page(
        self, ranking: Ranking, offset: int, k: int, min_score: float | None = None, min_itm: float | None = None
    ) -> tuple[list[Hit], bool]:
        """Hits [offset, offset + k) of a ranking, above `min_score` and, with `min_itm`, only
        re-ranked ones whose ITM P(match) reaches it; and whether more follow."""
        keep = np.arange(len(ranking.ids))
        if min_score is not None:
            keep = keep[ranking.score[keep] >= min_score]
        if min_itm is not None:
            # Only re-ranked hits have a P(match), and a deeper ranking re-ranks no more of
            # them: what is kept here is all there is.
            keep = keep[np.nan_to_num(ranking.itm[keep], nan=-1.0) >= min_itm]
        window = keep[offset : offset + k]
        deeper = min_itm is None and not ranking.exhausted
        has_more = len(keep) > offset + k or (deeper and len(window) == k)
        wanted = [int(ranking.ids[j]) for j in window]
        records = {i: ranking.records[i] for i in wanted if i in ranking.records}
        unread = [i for i in wanted if i not in records]
        if unread:
            records.update(self.library.catalog.images(unread))
        hits = []
        for j in window:
            rec = records.get(int(ranking.ids[j]))
            if rec is None or not rec.paths:
                continue  # deleted between the ANN search and now
            itm, itc = ranking.itm[j], ranking.itc[j]
            kw = ranking.keyword[j] if ranking.keyword is not None else np.nan
            hits.append(
                Hit(
                    image_id=rec.id,
                    paths=rec.paths,
                    itc=None if np.isnan(itc) else float(itc),
                    itm=None if np.isnan(itm) else float(itm),
                    score=float(ranking.score[j]),
                    width=rec.width,
                    height=rec.height,
                    taken_at=rec.taken_at,
                    camera=rec.camera,
                    caption=rec.caption,
                    keyword=None if np.isnan(kw) else float(kw),
                )
            )
        return hits, has_more

    def _itm(self, text: str, ids: np.ndarray, records: dict[int, ImageRecord]) -> np.ndarray:
        """ITM P(match) for each candidate; NaN where its ViT output cannot be had (see
        `ItmFeatures`). Records read to find files are left in `records`."""
        import torch

        features = self.itm_features.get(ids.tolist(), records)
        have = [i for i in ids.tolist() if i in features]
        out = np.full(len(ids), np.nan, dtype=np.float32)
        if not have:
            return out
        dtype = self.model.vision_dtype
        vit = torch.stack([features[i].to(dtype) for i in have])
        probs = self.model.itm(text, vit)
        pos = {image_id: j for j, image_id in enumerate(ids.tolist())}
        for image_id, p in zip(have, probs):
            out[pos[image_id]] = p
        return out
