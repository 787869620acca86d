"""The full-text index over captions and path words: one row per image, keyed by image id.

The store writes it in the same transaction as the rows it is derived from, so it can never
disagree with them after a crash. `TextIndex` is what the store needs from a backend: SQLite
FTS5, or on PostgreSQL a `tsvector` column with a GIN index, the same `KeywordQuery` compiled
to a `tsquery` (`&&`, `||`, `!!`, phrases as `<->`).
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Select

from searchengine.errors import SchemaError
from searchengine.media.keywords import Clause, KeywordQuery


@dataclass(frozen=True)
class KeywordHit:
    image_id: int
    coverage: float  # weighted share of the query's clauses the image matches, in [0, 1]
    relevance: float  # the backend's own relevance (FTS5: -bm25), higher is better


def clause_weight(matches: int, total: int) -> float:
    """How much a clause says, from how many of `total` images it matches: its IDF in bits,
    log2(total / matches), capped at 1. A clause that at least halves the library (or matches
    nothing) counts fully; one that matches most of it counts less, and one every image
    carries (the library's own folder name, "photo" under ~/Photos) counts nothing, so it
    cannot decide the ranking."""
    if matches <= 0 or total <= 0:
        return 1.0
    return min(1.0, max(0.0, math.log2(total / matches)))


def weighted_coverage(matched: Sequence[bool], weights: Sequence[float]) -> float:
    """The share of the query's weight an image's matched clauses carry (0 when no clause
    carries any: the words then say nothing about any image)."""
    total = sum(weights)
    if total <= 1e-9:
        return 0.0
    return sum(w for m, w in zip(matched, weights) if m) / total


def _within(conn: Connection, within: Select | None, column: str) -> str:
    """The SQL that keeps a pool to the ids `within` selects (nothing without it)."""
    if within is None:
        return ""
    return f" AND {column} IN ({within.compile(conn, compile_kwargs={'literal_binds': True})})"


def one_statement(
    conn: Connection, pool: str, clauses: Sequence[str], params: dict, total: Select | None, *, descending: bool, limit: int
) -> list[KeywordHit]:
    """The one search statement of every backend, and its ranking. `pool`: a select of (id, b),
    the candidates with the backend's relevance `b` (higher is better where `descending`,
    lower for FTS5's bm25); `clauses`: per clause of the query, a select of the ids it
    matches, materialised once (their lengths weigh the clauses, see `clause_weight`);
    `total`: a select counting the library's images. The best `limit` by weighted coverage,
    then relevance."""
    ctes = [f"pool AS ({pool})"] + [f"c{j} AS MATERIALIZED ({body})" for j, body in enumerate(clauses)]
    columns = ["pool.id", "pool.b"]
    for j in range(len(clauses)):
        columns += [f"pool.id IN (SELECT id FROM c{j})", f"(SELECT count(*) FROM c{j})"]
    if total is not None:
        columns.append(f"({total.compile(conn, compile_kwargs={'literal_binds': True})})")
    order = " DESC" if descending else ""
    rows = conn.execute(text(f"WITH {', '.join(ctes)} SELECT {', '.join(columns)} FROM pool ORDER BY pool.b{order}"), params).all()
    if not rows:
        return []
    n = len(clauses)
    first = rows[0]
    library_size = first[2 + 2 * n] if total is not None else 0
    weights = [clause_weight(first[3 + 2 * j], library_size) if library_size else 1.0 for j in range(n)]
    sign = 1.0 if descending else -1.0
    hits = [KeywordHit(int(r[0]), weighted_coverage([bool(r[2 + 2 * j]) for j in range(n)], weights), sign * float(r[1])) for r in rows]
    hits.sort(key=lambda h: (-h.coverage, -h.relevance, h.image_id))
    return hits[:limit]


class TextIndex(Protocol):
    def create(self, conn: Connection) -> None: ...

    def put(self, conn: Connection, rows: Iterable[tuple[int, str, str]]) -> None:
        """Replace the rows of these images: (image id, caption, path words)."""

    def delete(self, conn: Connection, ids: Iterable[int]) -> None: ...

    def count(self, conn: Connection) -> int: ...

    def clear(self, conn: Connection) -> None: ...

    def search(
        self, conn: Connection, query: KeywordQuery, limit: int, within: Select | None = None, total: Select | None = None
    ) -> list[KeywordHit]:
        """The best `limit` images by weighted coverage (see `clause_weight`; `total`: a select
        that counts the images in the library), then relevance; `within`: a select of allowed
        ids. One statement."""

    def matching(self, conn: Connection, clauses: Sequence[Clause]) -> list[int]:
        """Ids of images that match any of these clauses (for exclusions)."""


def _quote(clause: Clause) -> str:
    # Words are letters and digits only (keywords.words), so they need no escaping; a quoted
    # string of several words is an FTS5 phrase.
    return '"' + " ".join(clause) + '"'


def _any(clauses: Sequence[Clause]) -> str:
    return "(" + " OR ".join(_quote(c) for c in clauses) + ")"


class SqliteFts5:
    """FTS5 with the porter stemmer over unicode61 (so "dogs" finds "dog", "café" finds "cafe")."""

    table = "image_text"

    def create(self, conn: Connection) -> None:
        conn.execute(
            text(
                f"CREATE VIRTUAL TABLE IF NOT EXISTS {self.table} USING fts5("
                "caption, names, tokenize = 'porter unicode61 remove_diacritics 2')"
            )
        )

    def put(self, conn: Connection, rows: Iterable[tuple[int, str, str]]) -> None:
        rows = list(rows)
        if not rows:
            return
        self.delete(conn, [r[0] for r in rows])
        conn.execute(
            text(f"INSERT INTO {self.table}(rowid, caption, names) VALUES (:id, :caption, :names)"),
            [{"id": i, "caption": c or "", "names": n or ""} for i, c, n in rows],
        )

    def delete(self, conn: Connection, ids: Iterable[int]) -> None:
        ids = list(ids)
        if ids:
            conn.execute(text(f"DELETE FROM {self.table} WHERE rowid = :id"), [{"id": i} for i in ids])

    def count(self, conn: Connection) -> int:
        return conn.execute(text(f"SELECT count(*) FROM {self.table}")).scalar_one()

    def clear(self, conn: Connection) -> None:
        conn.execute(text(f"DELETE FROM {self.table}"))

    def _match(self, query: KeywordQuery) -> str:
        if query.required:
            expr = " AND ".join(_quote(c) for c in query.required)
        else:
            expr = _any(query.optional)
        if query.excluded:
            expr = f"({expr}) NOT {_any(query.excluded)}"
        return expr

    def search(
        self, conn: Connection, query: KeywordQuery, limit: int, within: Select | None = None, total: Select | None = None
    ) -> list[KeywordHit]:
        if not query.searchable or limit <= 0:
            return []
        t = self.table
        params: dict = {"q": self._match(query), "n": 4 * limit}
        params.update({f"c{j}": _quote(c) for j, c in enumerate(query.clauses)})
        # The pool: bm25 first, generously (coverage then re-orders it; bm25 already favours
        # rows matching more clauses, so it holds the best-covered ones). Each clause's whole
        # match list, materialised once: FTS5 reads a doclist fast, while MATCH with
        # `rowid IN (pool)` probes the index once per id (measured 5x slower); its length is
        # the clause's document frequency, which weighs it.
        pool = f"SELECT rowid AS id, bm25({t}) AS b FROM {t} WHERE {t} MATCH :q{_within(conn, within, 'rowid')} ORDER BY bm25({t}) LIMIT :n"
        clauses = [f"SELECT rowid AS id FROM {t} WHERE {t} MATCH :c{j}" for j in range(len(query.clauses))]
        return one_statement(conn, pool, clauses, params, total, descending=False, limit=limit)

    def matching(self, conn: Connection, clauses: Sequence[Clause]) -> list[int]:
        if not clauses:
            return []
        q = text(f"SELECT rowid FROM {self.table} WHERE {self.table} MATCH :q")
        return [int(r[0]) for r in conn.execute(q, {"q": _any(clauses)})]


def fold(text_: str) -> str:
    """Lower case, accents off ("Café" -> "cafe"): what FTS5's unicode61 tokenizer does with
    remove_diacritics, done here for PostgreSQL (whose `unaccent` is an extension that a
    database may not have)."""
    decomposed = unicodedata.normalize("NFKD", text_ or "")
    return "".join(c for c in decomposed if not unicodedata.combining(c)).lower()


class PostgresTsvector:
    """A `tsvector` column with a GIN index, in a text search configuration of its own:
    English Snowball stemming ("dogs" finds "dog", as FTS5's porter does) and no stop words
    (FTS5 has none: "a", "the" and "on" are words you can look for). Captions and names are
    folded (`fold`) before both indexing and querying. Each clause is a phrase
    (`phraseto_tsquery`: words adjacent, in order); clauses combine with `&&`, `||` and `!!`.
    Relevance: `ts_rank`."""

    table = "image_text"
    config = "searchengine_english"

    def create(self, conn: Connection) -> None:
        has = conn.execute(text("SELECT 1 FROM pg_ts_config WHERE cfgname = :c"), {"c": self.config}).first()
        if has is None:
            conn.execute(text("CREATE TEXT SEARCH DICTIONARY searchengine_snowball (TEMPLATE = snowball, Language = english)"))
            conn.execute(text(f"CREATE TEXT SEARCH CONFIGURATION {self.config} (COPY = english)"))
            conn.execute(text(
                f"ALTER TEXT SEARCH CONFIGURATION {self.config} ALTER MAPPING FOR asciiword, asciihword, hword_asciipart, "
                "word, hword, hword_part WITH searchengine_snowball"
            ))
        conn.execute(text(
            f"CREATE TABLE IF NOT EXISTS {self.table} (id integer PRIMARY KEY, caption text NOT NULL, "
            "names text NOT NULL, doc tsvector NOT NULL)"
        ))
        conn.execute(text(f"CREATE INDEX IF NOT EXISTS {self.table}_doc ON {self.table} USING gin (doc)"))

    def put(self, conn: Connection, rows: Iterable[tuple[int, str, str]]) -> None:
        rows = list(rows)
        if not rows:
            return
        self.delete(conn, [r[0] for r in rows])
        conn.execute(
            text(
                f"INSERT INTO {self.table}(id, caption, names, doc) VALUES (:id, :caption, :names, "
                f"to_tsvector('{self.config}', :fc || ' ' || :fn))"
            ),
            [{"id": i, "caption": c or "", "names": n or "", "fc": fold(c or ""), "fn": fold(n or "")} for i, c, n in rows],
        )

    def delete(self, conn: Connection, ids: Iterable[int]) -> None:
        ids = list(ids)
        if ids:
            conn.execute(text(f"DELETE FROM {self.table} WHERE id = ANY(:ids)"), {"ids": ids})

    def count(self, conn: Connection) -> int:
        return conn.execute(text(f"SELECT count(*) FROM {self.table}")).scalar_one()

    def clear(self, conn: Connection) -> None:
        conn.execute(text(f"DELETE FROM {self.table}"))

    def _phrase(self, name: str) -> str:
        return f"phraseto_tsquery('{self.config}', :{name})"

    def _query(self, query: KeywordQuery, params: dict) -> str:
        def clause(c: Clause) -> str:
            name = f"q{len(params)}"
            params[name] = fold(" ".join(c))
            return self._phrase(name)

        if query.required:
            expr = " && ".join(clause(c) for c in query.required)
        else:
            expr = "(" + " || ".join(clause(c) for c in query.optional) + ")"
        if query.excluded:
            expr = f"({expr}) && !!(" + " || ".join(clause(c) for c in query.excluded) + ")"
        return expr

    def search(
        self, conn: Connection, query: KeywordQuery, limit: int, within: Select | None = None, total: Select | None = None
    ) -> list[KeywordHit]:
        if not query.searchable or limit <= 0:
            return []
        t = self.table
        params: dict = {}
        q = self._query(query, params)
        params["n"] = 4 * limit
        params.update({f"c{j}": fold(" ".join(c)) for j, c in enumerate(query.clauses)})
        pool = f"SELECT id, ts_rank(doc, {q}) AS b FROM {t} WHERE doc @@ ({q}){_within(conn, within, 'id')} ORDER BY b DESC LIMIT :n"
        clauses = [f"SELECT id FROM {t} WHERE doc @@ {self._phrase(f'c{j}')}" for j in range(len(query.clauses))]
        return one_statement(conn, pool, clauses, params, total, descending=True, limit=limit)

    def matching(self, conn: Connection, clauses: Sequence[Clause]) -> list[int]:
        if not clauses:
            return []
        params = {f"m{i}": fold(" ".join(c)) for i, c in enumerate(clauses)}
        expr = " || ".join(self._phrase(name) for name in params)
        return [int(r[0]) for r in conn.execute(text(f"SELECT id FROM {self.table} WHERE doc @@ ({expr}) ORDER BY id"), params)]


def text_index_for(dialect: str) -> TextIndex:
    if dialect == "sqlite":
        return SqliteFts5()
    if dialect == "postgresql":
        return PostgresTsvector()
    raise SchemaError(f"keyword search is built for SQLite and PostgreSQL, not {dialect}")
