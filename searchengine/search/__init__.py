"""Search: a request checked once (`request`), ranked by the `searcher` (ITC candidates, ITM
re-ranking, keyword and hybrid modes, image queries), answered in pages (`ranking`); the ITM
inputs (`itm`) and near-duplicates (`duplicates`) beside them."""

from searchengine.search.ranking import Hit, Page, Ranking, RankingCache, image_similarity, rrf
from searchengine.search.request import (
    MAX_K, MAX_OFFSET, MODES, Filters, SearchRequest, Steer, check_examples, check_filters, check_min_itm, check_page,
    check_query, parse_example, parse_for_mode,
)
from searchengine.search.searcher import Searcher

__all__ = [
    "Hit", "Page", "Ranking", "RankingCache", "image_similarity", "rrf", "MAX_K", "MAX_OFFSET", "MODES", "Filters",
    "SearchRequest", "Steer", "check_examples", "check_filters", "check_min_itm", "check_page", "check_query",
    "parse_example", "parse_for_mode", "Searcher",
]
