"""The library as a whole: its folders, its statistics, its near-duplicates."""

from __future__ import annotations

import asyncio
import os
from typing import Annotated

from fastapi import APIRouter, Query, Request

from searchengine.app.api.deps import Filtering, Service, State
from searchengine.app.api.guards import PLAIN_TEXT, loopback
from searchengine.app.api.schemas import NOT_FOUND, DuplicateGroupOut, DuplicateOut, DuplicatesOut, FacetsOut, FacetValue, FolderOut, FoldersOut, StatsOut, image_urls
from searchengine.search.duplicates import DEFAULT_THRESHOLD, with_details

router = APIRouter()


@router.get("/api/folders", response_model=FoldersOut)
async def folders(
    service: Service,
    q: Annotated[
        str, Query(max_length=1000, pattern=PLAIN_TEXT, description="only folders whose path contains this, in any case")
    ] = "",
    limit: Annotated[int, Query(ge=1, le=1000, description="at most this many folders")] = 50,
):
    """Indexed folders, subfolders included, with image counts (for the folder filter's suggestions)."""
    found, total = await asyncio.to_thread(service.folders, q, limit)
    return FoldersOut(folders=[FolderOut(path=f.path, images=f.images) for f in found], total=total)


@router.get("/api/stats", response_model=StatsOut)
def stats(service: Service, state: State, request: Request) -> StatsOut:
    """Images, failures by reason, model, index type and sizes on disk.

    The server's own paths (its data directory, a model directory) are shown to callers
    that hold the API key, or, where no key is set, to callers on this machine; others get
    names only (`server_paths_hidden`). Failed files' paths are photo paths, shown as
    search hits show them."""
    service.refresh()
    described = service.library.describe()
    trusted = state.settings.api_key is not None or loopback(request)
    if not trusted:
        described["data_dir"] = None
        described["store"] = None  # a file path, or a database server's address
        if described["model"] and os.path.isabs(described["model"]):
            described["model"] = os.path.basename(described["model"].rstrip("/"))
    return StatsOut(**described, server_paths_hidden=not trusted)


@router.get("/api/duplicates", response_model=DuplicatesOut)
async def duplicates(
    service: Service,
    threshold: Annotated[
        float, Query(ge=0.5, le=1.0, description="image-to-image score at or above which two images are near-duplicates")
    ] = DEFAULT_THRESHOLD,
    limit: Annotated[int, Query(ge=1, le=200, description="groups per page")] = 20,
    offset: Annotated[int, Query(ge=0, le=1_000_000, description="groups to skip")] = 0,
):
    """Groups of near-duplicate images (resized, re-encoded, lightly cropped or edited copies,
    bursts), largest first, to see which to keep. Read-only: nothing is ever deleted.
    The first request after the library changes finds them (seconds for 10k images); later
    pages come from that result."""
    found = await asyncio.to_thread(service.duplicates, threshold)
    page = found.groups[offset : offset + limit]
    shown = await asyncio.to_thread(with_details, service.library, page)
    groups = [
        DuplicateGroupOut(images=[
            DuplicateOut(
                id=m.id, path=d.files[0].path, paths=[f.path for f in d.files], width=d.width, height=d.height,
                bytes=d.files[0].size, taken_at=d.taken_at, score=round(m.score, 6),
                **image_urls(m.id),
            )
            for m, d in members
        ])
        for members in shown
    ]
    more = offset + limit < len(found.groups)
    return DuplicatesOut(
        threshold=found.threshold, total=len(found.groups), offset=offset, next_offset=offset + limit if more else None,
        images=found.images, pairs_scored=found.pairs_scored, groups=groups,
        timings_ms={k: round(v, 3) for k, v in found.timings_ms.items()},
    )


@router.get("/api/facets", response_model=FacetsOut, responses=NOT_FOUND)
async def facets(service: Service, f: Filtering):
    """Cameras, lenses, file types and orientations with image counts, for the filter panel:
    each facet's counts are among the images within the other filters. Cameras and lenses
    come from EXIF (images indexed before lenses were read show none until re-indexed)."""
    found = await asyncio.to_thread(service.facets, f.filters)
    return FacetsOut(**{name: [FacetValue(value=v, images=n) for v, n in values] for name, values in found.items()})
