"""Searches: by words, by an uploaded example, and "more like this"."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile

from searchengine.app.api.deps import ImageId, Paging, Service, State
from searchengine.app.api.guards import QUERY_TEXT
from searchengine.app.api.schemas import NOT_FOUND, ErrorOut, Mode, SearchOut, search_out
from searchengine.errors import UploadError, UploadTooLarge
from searchengine.search import SearchRequest, Steer

# ID or ID:WEIGHT: an id from 1 (up to 18 digits, within the store's 64-bit ids), a weight up to
# 10 (above 0: a rule the pattern leaves to the server); spaces around, never other white space.
EXAMPLE = r"^ *0*[1-9][0-9]{0,17}(:(10(\.0*)?|[0-9](\.[0-9]*)?|\.[0-9]+))? *$"

router = APIRouter()


@router.get("/api/search", response_model=SearchOut, responses={400: {"model": ErrorOut}, **NOT_FOUND})
async def search(
    service: Service,
    state: State,
    q: Annotated[
        str,
        Query(description="what to look for, in words (at least one letter or digit); empty only with `like`",
              pattern=QUERY_TEXT),
    ],
    p: Paging,
    rerank: Annotated[bool, Query(description="re-rank the top candidates with the ITM head")] = True,
    mode: Annotated[
        Mode | None,
        Query(description="hybrid (default): semantic and keyword candidates fused, then ITM re-rank; "
              "semantic: ITC then ITM only; keyword: captions and file/folder names only"),
    ] = None,
    like: Annotated[
        list[Annotated[str, Query(pattern=EXAMPLE)]],
        Query(description="steer towards these indexed images: `ID` or `ID:WEIGHT` (weight 1 by default), "
              "repeatable. With liked images, `q` may be empty: images like these, by ITC alone"),
    ] = [],
    unlike: Annotated[
        list[Annotated[str, Query(pattern=EXAMPLE)]],
        Query(description="steer away from these indexed images (`ID` or `ID:WEIGHT`); they are left out"),
    ] = [],
    min_itm: Annotated[
        float | None,
        Query(ge=0, le=1, description="only matches: keep re-ranked hits whose ITM P(match) is at least this"),
    ] = None,
):
    """Text-to-image search. `"phrase"` and `-word` work in every mode; see `mode`.

    Combined queries: the ITC query vector is normalise(t + sum w_i m_i - sum w_j m_j), with t
    the words' vector, m the normalised mean query vector of each liked (+) and unliked (-)
    image and w its weight; ITM re-ranks with the words. `strong` counts the re-ranked hits
    whose P(match) reaches `min_itm` (else 0.5).

    Results that sharpen: ask with `rerank=false` first (ITC order, in milliseconds), then
    the same query with `rerank=true` (ITM order; the ITC candidates are not searched again)."""
    request = SearchRequest.checked(
        q, state.settings, k=p.k, offset=p.offset, rerank=None if rerank else 0, filters=p.filters,
        min_score=p.min_score, min_itm=min_itm, mode=mode.value if mode is not None else None,
        steer=Steer.parse(like, unlike),
    )
    page = await service.search_text(request)
    return search_out(page, p.k, p.offset, request.mode)


@router.post("/api/search/image", response_model=SearchOut, responses={400: {"model": ErrorOut}, 413: {"model": ErrorOut}, **NOT_FOUND})
async def search_image(
    service: Service,
    state: State,
    image: Annotated[UploadFile, File(description="the example image (JPEG, PNG, HEIC, ...); not empty", json_schema_extra={"minLength": 1})],
    p: Paging,
):
    """Image-to-image search by an uploaded example (score: mean over query vectors of the best match)."""
    data = await read_capped(image, state.settings.max_upload_bytes)
    if not data:
        raise UploadError("the upload is empty: send the example image's bytes")
    page = await service.search_image(data, k=p.k, offset=p.offset, min_score=p.min_score, filters=p.filters)
    return search_out(page, p.k, p.offset)


@router.get("/api/images/{image_id}/similar", response_model=SearchOut, responses=NOT_FOUND)
async def similar(service: Service, image_id: ImageId, p: Paging):
    """Images most like an indexed one ("more like this"), itself left out."""
    page = await service.similar(image_id, k=p.k, offset=p.offset, min_score=p.min_score, filters=p.filters)
    return search_out(page, p.k, p.offset)


async def read_capped(upload: UploadFile, limit: int) -> bytes:
    chunks, total = [], 0
    while chunk := await upload.read(1 << 20):
        total += len(chunk)
        if total > limit:
            raise UploadTooLarge(f"the upload is over the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
