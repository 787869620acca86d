"""Searches: by words, by an uploaded example, and "more like this"."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile

from searchengine.api.deps import ImageId, Paging, Service, State
from searchengine.api.guards import PLAIN_TEXT
from searchengine.api.schemas import ErrorOut, Mode, SearchOut, search_out
from searchengine.errors import UploadTooLarge
from searchengine.queries import Steer

EXAMPLE = r"^\s*[0-9]{1,19}(:[0-9]*\.?[0-9]+)?\s*$"  # ID or ID:WEIGHT

router = APIRouter()


@router.get("/api/search", response_model=SearchOut, responses={400: {"model": ErrorOut}})
async def search(
    service: Service,
    state: State,
    q: Annotated[str, Query(description="what to look for, in words", pattern=PLAIN_TEXT)],
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
    mode_name = mode.value if mode is not None else state.settings.search_mode
    steer = Steer.parse(like, unlike)
    page = await service.search_text(
        q, k=p.k, offset=p.offset, rerank=rerank, min_score=p.min_score, filters=p.filters, mode=mode_name,
        steer=steer, min_itm=min_itm,
    )
    return search_out(page, p.k, p.offset, mode_name if q.strip() else "semantic")


@router.post("/api/search/image", response_model=SearchOut, responses={400: {"model": ErrorOut}, 413: {"model": ErrorOut}})
async def search_image(
    service: Service,
    state: State,
    image: Annotated[UploadFile, File(description="the example image")],
    p: Paging,
):
    """Image-to-image search by an uploaded example (score: mean over query vectors of the best match)."""
    data = await _read_capped(image, state.settings.max_upload_bytes)
    page = await service.search_image(data, k=p.k, offset=p.offset, min_score=p.min_score, filters=p.filters)
    return search_out(page, p.k, p.offset)


@router.get("/api/images/{image_id}/similar", response_model=SearchOut, responses={404: {"model": ErrorOut}})
async def similar(service: Service, image_id: ImageId, p: Paging):
    """Images most like an indexed one ("more like this"), itself left out."""
    page = await service.similar(image_id, k=p.k, offset=p.offset, min_score=p.min_score, filters=p.filters)
    return search_out(page, p.k, p.offset)


async def _read_capped(upload: UploadFile, limit: int) -> bytes:
    chunks, total = [], 0
    while chunk := await upload.read(1 << 20):
        total += len(chunk)
        if total > limit:
            raise UploadTooLarge(f"the upload is over the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
