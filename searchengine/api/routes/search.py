"""Searches: by words, by an uploaded example, and "more like this"."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile

from searchengine.api.deps import ImageId, Paging, Service, State
from searchengine.api.guards import PLAIN_TEXT
from searchengine.api.schemas import ErrorOut, Mode, SearchOut, search_out
from searchengine.errors import UploadTooLarge

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
):
    """Text-to-image search. `"phrase"` and `-word` work in every mode; see `mode`."""
    mode_name = mode.value if mode is not None else state.settings.search_mode
    page = await service.search_text(
        q, k=p.k, offset=p.offset, rerank=rerank, min_score=p.min_score, filters=p.filters, mode=mode_name
    )
    return search_out(page, p.k, p.offset, mode_name)


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
