"""What a search answers, and how candidates are ordered: rankings and their pages, the
rankings kept across requests, reciprocal rank fusion, the image-to-image score."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Hashable

import numpy as np


if TYPE_CHECKING:

    from searchengine.store.records import ImageRecord


@dataclass
class Hit:
    image_id: int
    paths: list[str]
    itc: float | None  # None: a keyword search run without the model
    itm: float | None
    score: float
    width: int
    height: int
    taken_at: str | None = None
    camera: str | None = None
    caption: str | None = None
    keyword: float | None = None  # share of the query's words its caption and names match

    @property
    def path(self) -> str:
        return self.paths[0]

    def as_json(self) -> dict:
        """The one JSON form of a hit: `search --json`'s results and /api/search's hits (which
        add the URLs of the image's files) hold these fields."""
        return {
            "id": self.image_id, "path": self.path, "paths": self.paths, "score": self.score, "itm": self.itm,
            "itc": self.itc, "keyword": self.keyword, "caption": self.caption, "width": self.width,
            "height": self.height, "taken_at": self.taken_at, "camera": self.camera,
        }


@dataclass
class Page:
    """A page of hits of one query, for the CLI and the API alike."""

    hits: list[Hit]
    has_more: bool
    reranked: int  # how many of the ranking's candidates ITM re-scored
    timings_ms: dict[str, float]
    query: str | None = None  # the text query as searched (whitespace normalised)
    fresh: bool = False  # the ranking was computed for this request (not a kept one)
    # Re-ranked hits whose ITM P(match) reaches the threshold (`min_itm`, else `strong_match`):
    # "N strong matches". None where nothing was re-ranked.
    strong: int | None = None


@dataclass
class Ranking:
    """The ranked candidates of one query, best first (arrays of equal length)."""

    ids: np.ndarray
    itc: np.ndarray  # ITC score (for an image query: the image-to-image score)
    itm: np.ndarray  # ITM P(match), NaN where not re-ranked
    score: np.ndarray  # final: ITM + ITC where re-ranked, else ITC
    depth: int  # how many were asked for
    exhausted: bool  # the index (or the filter) had fewer than `depth`
    timings: dict[str, float]

    query_vector: np.ndarray | None = None  # a text query's vector, kept for deeper rankings
    keyword: np.ndarray | None = None  # keyword score (share of words matched), NaN where none
    # Records read while ranking (re-running the ViT needs the files' paths): a page of hits
    # among them needs no second read.
    records: dict[int, ImageRecord] = field(default_factory=dict)

    @property
    def reranked(self) -> int:
        return int((~np.isnan(self.itm)).sum())

    def after(self, served: "Ranking") -> "Ranking":
        """This deeper ranking, with the shallower one it extends kept as its head: pages
        already served stay put, so paging on never repeats or skips an image. (With the
        exact tier the heads agree anyway; an approximate tier's deeper search may propose an
        image the shallower one missed, which then comes after the served ones.)"""
        seen = set(served.ids.tolist())
        tail = np.array([i not in seen for i in self.ids.tolist()], dtype=bool)

        def join(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
            if a is None or b is None:
                return None
            return np.concatenate([a, b[tail]])

        return Ranking(
            join(served.ids, self.ids), join(served.itc, self.itc), join(served.itm, self.itm),
            join(served.score, self.score), self.depth, self.exhausted, self.timings, self.query_vector,
            join(served.keyword, self.keyword), {**served.records, **self.records},
        )

    def itm_by_id(self) -> dict[int, float]:
        done = ~np.isnan(self.itm)
        return dict(zip(self.ids[done].tolist(), self.itm[done].tolist()))


@dataclass(frozen=True)
class Pool:
    """A mode's candidates, in the order ITM takes them: ITC (NaN without a model) and keyword
    share (NaN where no word matched) alongside; `exhausted`: fewer than asked for exist."""

    ids: np.ndarray
    itc: np.ndarray
    keyword: np.ndarray
    exhausted: bool


class RankingCache:
    """Rankings kept across requests, least recently used out first (the service's), so that
    the next page of a query costs no model call and a deeper one re-uses its ITM scores.
    Keys carry the library's revision: a change to the library makes every ranking stale."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._kept: OrderedDict[Hashable, Ranking] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, depth: int) -> tuple[Ranking | None, Ranking | None]:
        """(a kept ranking deep enough for `depth`, else None; a shallower one, if kept)."""
        with self._lock:
            ranking = self._kept.get(key)
            if ranking is None:
                return None, None
            self._kept.move_to_end(key)
            if ranking.depth < depth and not ranking.exhausted:
                return None, ranking
            return ranking, None

    def keep(self, key: Hashable, ranking: Ranking) -> None:
        if self.size == 0:
            return
        with self._lock:
            self._kept[key] = ranking
            self._kept.move_to_end(key)
            while len(self._kept) > self.size:
                self._kept.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()


def rrf(ranked_lists: list[np.ndarray], k: int) -> dict[int, float]:
    """Reciprocal rank fusion: each id scores the sum over lists of 1 / (k + its 1-based rank)."""
    fused: dict[int, float] = {}
    for ids in ranked_lists:
        for rank, image_id in enumerate(ids.tolist(), 1):
            fused[image_id] = fused.get(image_id, 0.0) + 1.0 / (k + rank)
    return fused


def image_similarity(query: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Image-to-image score of `query` [Q, D] against each of `others` [n, Q, D].

    The mean over the query's Q vectors of each one's best match among the other image's Q
    vectors (ColBERT's MaxSim, averaged). Every query token has its say, unlike a max over
    all Q x Q pairs, which one shared background patch can decide. 1.0 for identical images.
    """
    sims = np.einsum("qd,npd->nqp", query, others)
    return sims.max(axis=2).mean(axis=1).astype(np.float32)
