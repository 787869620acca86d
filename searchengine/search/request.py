"""What a search asks: the filters, example images that steer it, the page, the mode, and a
text query's `SearchRequest`, checked once where it comes in."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import TYPE_CHECKING, Sequence

from searchengine.errors import FolderNotFoundError, ImageNotFoundError, QueryError
from searchengine.media.imageio import ORIENTATIONS
from searchengine.media.keywords import KeywordQuery, parse_query, words
from searchengine.util import nearest

if TYPE_CHECKING:

    from searchengine.config.settings import Settings


@dataclass(frozen=True)
class Filters:
    folder: str | None = None  # images with a file below it: a path or a folder's name (`store.folder_condition`)
    taken_after: str | None = None  # ISO date or date-time, inclusive
    taken_before: str | None = None
    camera: str | None = None  # as `stats` and the facets name it (EXIF make and model)
    lens: str | None = None  # EXIF LensModel
    file_type: str | None = None  # jpeg, png, heic, ... (imageio.FILE_TYPES), by the file's extension
    orientation: str | None = None  # landscape, portrait or square, as the image is shown

    @property
    def active(self) -> bool:
        return any((self.folder, self.taken_after, self.taken_before, self.camera, self.lens, self.file_type, self.orientation))

    @classmethod
    def build(
        cls, folder: str | None = None, taken_after: date | None = None, taken_before: date | None = None, *,
        camera: str | None = None, lens: str | None = None, file_type: str | None = None, orientation: str | None = None,
    ) -> "Filters":
        """From dates or date-times: a date after covers its whole day, and so does one before."""
        from searchengine.media.imageio import FILE_TYPES

        def iso(value: date | None, end: bool) -> str | None:
            if value is None:
                return None
            if isinstance(value, datetime):
                return value.replace(tzinfo=None).isoformat(timespec="seconds")
            return f"{value.isoformat()}T23:59:59" if end else f"{value.isoformat()}T00:00:00"

        after, before = iso(taken_after, False), iso(taken_before, True)
        if after and before and after > before:
            raise QueryError("taken_after is later than taken_before")
        if file_type and file_type.lower() not in FILE_TYPES:
            raise QueryError(f"the file type is one of {', '.join(FILE_TYPES)}, not {file_type!r}")
        if orientation and orientation.lower() not in ORIENTATIONS:
            raise QueryError(f"the orientation is one of {', '.join(ORIENTATIONS)}, not {orientation!r}")
        return cls(
            folder=folder or None, taken_after=after, taken_before=before, camera=camera or None, lens=lens or None,
            file_type=file_type.lower() if file_type else None, orientation=orientation.lower() if orientation else None,
        )


Example = tuple[int, float]  # (image id, weight)


def parse_example(value: str) -> Example:
    """`ID` or `ID:WEIGHT` (weight 1 by default; above 0), as `--like`/`like=` take them."""
    head, sep, tail = str(value).strip().partition(":")
    try:
        image_id = int(head)
        weight = float(tail) if sep else 1.0
    except ValueError:
        raise QueryError(f"an example image is written ID or ID:WEIGHT (42, 42:0.5), not {value!r}") from None
    if image_id < 1:
        raise QueryError(f"an example image's id is a positive number, not {image_id}")
    if not (0 < weight <= 10):  # NaN fails this too
        raise QueryError(f"an example image's weight must be above 0 and at most 10, not {tail}")
    return image_id, weight


# A page of results, for every interface: the API states these in its schema (a page of at
# most MAX_K, at most MAX_OFFSET deep); the CLI prints as many as it is asked for.
MAX_K = 200
MAX_OFFSET = 10_000


def check_page(k: int, offset: int = 0, *, k_name: str = "k") -> None:
    if k < 1:
        raise QueryError(f"{k_name} must be at least 1, not {k}")
    if offset < 0:
        raise QueryError(f"offset must be at least 0, not {offset}")


def check_min_itm(min_itm: float | None, *, name: str = "min_itm") -> None:
    if min_itm is not None and not (0.0 <= min_itm <= 1.0):  # NaN fails this too
        raise QueryError(f"{name} is a probability, from 0 to 1, not {min_itm}")


def check_filters(library, filters: Filters | None) -> None:
    """FolderNotFoundError when the folder filter names no indexed folder: a typo or a path
    written the wrong way would otherwise look like a search with no results. Needs the
    library alone, so the CLI asks it before any model loads."""
    if filters is None or not filters.folder or library.catalog.folder_has_images(filters.folder):
        return
    near = nearest.indexed_folder(filters.folder, [f.path for f in library.catalog.folders()])
    raise FolderNotFoundError(
        f"no indexed folder matches {filters.folder!r}{nearest.did_you_mean(near)}. Give a folder's absolute path "
        "(/home/me/Pictures/Trips), a path from your home folder (~/Pictures/Trips), or a folder's "
        "name or the last parts of its path (Trips, Trips/Winter 2022); see /api/folders for the "
        "indexed folders"
    )


def check_examples(library, steer: "Steer") -> None:
    """ImageNotFoundError naming the first example image (liked, then unliked) that is not in
    the index; like `check_filters`, answerable before a model loads."""
    wanted = [(i, "liked") for i, _ in steer.like] + [(i, "unliked") for i, _ in steer.unlike]
    known = library.catalog.images([i for i, _ in wanted]) if wanted else {}
    for image_id, what in wanted:
        if image_id not in known:
            raise ImageNotFoundError(f"the {what} example image {image_id} is not in the index")


@dataclass(frozen=True)
class Steer:
    """Example images that steer a query (combined queries): `like` pulls its ITC vector
    towards them, `unlike` pushes it away, each with a weight.

    The combined query vector (`Searcher.steered_vector`):

        q = normalise(t + sum_i w_i * m_i - sum_j w_j * m_j)

    where t is the text's ITC vector (left out when there are no words), m an example image's
    mean query vector, normalised (BLIP-2 keeps 32 per image), and the w their weights. ITC
    candidates come from q; ITM re-ranks them with the words alone. The `unlike` images
    themselves are left out of the results."""

    like: tuple[Example, ...] = ()
    unlike: tuple[Example, ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.like or self.unlike)

    @classmethod
    def parse(cls, like: "Sequence[str | int]" = (), unlike: "Sequence[str | int]" = ()) -> "Steer":
        steer = cls(tuple(parse_example(v) for v in like), tuple(parse_example(v) for v in unlike))
        both = {i for i, _ in steer.like} & {i for i, _ in steer.unlike}
        if both:
            raise QueryError(f"image {min(both)} is both liked and unliked")
        if len(steer.like) + len(steer.unlike) > 50:
            raise QueryError("at most 50 example images (like and unlike together)")
        return steer


MODES = ("hybrid", "semantic", "keyword")


def parse_for_mode(text: str, mode: str) -> KeywordQuery:
    """The keyword reading of a query; QueryError if this mode has nothing in it to look for."""
    if mode not in MODES:
        raise QueryError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    kq = parse_query(text)
    # Semantic text with no letter or digit at all ("!!!", a lone quote mark) says nothing.
    if (mode == "keyword" and not kq.searchable) or (mode != "keyword" and not words(kq.semantic_text)):
        if kq.excluded:
            raise QueryError("the query has no words to look for, only exclusions (-word); add a word")
        raise QueryError("the query has no words to look for (only punctuation or quote marks); type some words")
    return kq

def check_query(query: str, max_chars: int, *, examples_only: bool = False) -> str:
    """The query, whitespace-normalised; QueryError if it cannot be searched.
    `examples_only`: liked example images stand in for words, so no words is fine."""
    text = " ".join((query or "").split())
    if not text and not examples_only:
        raise QueryError("the query is empty: type some words that describe the picture")
    if len(text) > max_chars:
        raise QueryError(f"the query is {len(text)} characters long; the limit is {max_chars}")
    return text


@dataclass(frozen=True)
class SearchRequest:
    """A text query and everything that shapes its answer, checked once (`checked`) where it
    comes in (the CLI before any model loads, the API's route), then handed whole to
    `Searcher.run`, which checks nothing again."""

    text: str  # whitespace-normalised; "" when liked examples alone are the query
    mode: str  # as searched: liked examples without words are ranked semantically
    keywords: KeywordQuery  # the keyword reading of `text` in this mode
    k: int = 10
    offset: int = 0
    rerank: int | None = None  # how many candidates ITM re-scores; None: the `rerank_top` setting
    filters: Filters = Filters()
    min_score: float | None = None
    min_itm: float | None = None  # keep only re-ranked hits whose ITM P(match) reaches it
    steer: Steer = Steer()

    @classmethod
    def checked(
        cls, query: str, settings: "Settings", *, k: int = 10, offset: int = 0, rerank: int | None = None,
        filters: Filters | None = None, min_score: float | None = None, min_itm: float | None = None,
        mode: str | None = None, steer: Steer | None = None, names: dict[str, str] | None = None,
    ) -> "SearchRequest":
        """The request, or QueryError saying what is wrong with it. `names`: how the caller
        calls `k` and `min_itm` in its messages (the CLI: `-k`, `--min-itm`)."""
        names = names or {}
        steer = steer or Steer()
        text = check_query(query, settings.max_query_chars, examples_only=bool(steer.like))
        mode = mode or settings.search_mode
        if text:
            kq = parse_for_mode(text, mode)
        else:  # liked examples alone: ranked by ITC, as "more like these"
            if mode == "keyword":
                raise QueryError("keyword search needs words; example images steer the semantic side")
            kq, mode = parse_query(""), "semantic"
        check_page(k, offset, k_name=names.get("k", "k"))
        check_min_itm(min_itm, name=names.get("min_itm", "min_itm"))
        if steer.active and mode == "keyword":
            raise QueryError("example images (like/unlike) steer the semantic side, which keyword mode has not; use mode hybrid or semantic")
        return cls(text, mode, kq, k, offset, rerank, filters or Filters(), min_score, min_itm, steer)
