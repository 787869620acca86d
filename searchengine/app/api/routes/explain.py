"""Where a query matches a photo: a heat map over the ViT's patches (Grad-CAM over ITM), for
an indexed image (JSON, and the map over its preview as a PNG) or an upload."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response

from searchengine.app.api.deps import ImageId, Service, State
from searchengine.app.api.guards import QUERY_TEXT
from searchengine.app.api.routes.search import read_capped
from searchengine.app.api.schemas import FILE_RESPONSES, ErrorOut, ExplainOut
from searchengine.errors import UploadError

router = APIRouter()

Text = Annotated[str, Query(description="the words to explain (what the photo was searched for)", min_length=1, pattern=QUERY_TEXT)]
RESPONSES = {400: {"model": ErrorOut}, 404: {"model": ErrorOut}, 409: {"model": ErrorOut}}


@router.get("/api/images/{image_id}/explain", response_model=ExplainOut, responses=RESPONSES)
async def explain(service: Service, image_id: ImageId, q: Text):
    """Which parts of the photo made the ITM head match it to `q`: a patch grid, peak 1,
    from one ITM forward and backward (it runs only when asked)."""
    return ExplainOut.of(await asyncio.to_thread(service.explain, image_id, q))


@router.get("/api/images/{image_id}/explain.png", response_class=Response, responses={**FILE_RESPONSES, 400: {"model": ErrorOut}})
async def explain_png(service: Service, image_id: ImageId, q: Text):
    """The map of `q` over the photo's preview (its size), red to yellow where it matches."""
    explained = await asyncio.to_thread(service.explain, image_id, q, overlay=True)
    return Response(explained.png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@router.post("/api/explain", response_model=ExplainOut, responses={**RESPONSES, 413: {"model": ErrorOut}})
async def explain_upload(
    service: Service,
    state: State,
    image: Annotated[UploadFile, File(description="the image (JPEG, PNG, HEIC, ...); not empty", json_schema_extra={"minLength": 1})],
    q: Annotated[str, Form(description="the words to explain", min_length=1, pattern=QUERY_TEXT)],
):
    """The map of `q` over an uploaded image, and the map drawn over it (`overlay_png`)."""
    data = await read_capped(image, state.settings.max_upload_bytes)
    if not data:
        raise UploadError("the upload is empty: send the image's bytes")
    return ExplainOut.of(await service.explain_upload(data, q))
