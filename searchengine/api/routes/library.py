"""The library as a whole: its folders and its statistics."""

from __future__ import annotations

import asyncio
import os
from typing import Annotated

from fastapi import APIRouter, Query, Request

from searchengine.api.deps import Service, State
from searchengine.api.guards import loopback
from searchengine.api.schemas import FolderOut, FoldersOut

router = APIRouter()


@router.get("/api/folders", response_model=FoldersOut)
async def folders(
    service: Service,
    q: Annotated[str, Query(max_length=1000, description="only folders whose path contains this, in any case")] = "",
    limit: Annotated[int, Query(ge=1, le=1000, description="at most this many folders")] = 50,
):
    """Indexed folders, subfolders included, with image counts (for the folder filter's suggestions)."""
    found, total = await asyncio.to_thread(service.folders, q, limit)
    return FoldersOut(folders=[FolderOut(path=f.path, images=f.images) for f in found], total=total)


@router.get("/api/stats")
def stats(service: Service, state: State, request: Request) -> dict:
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
        if described["model"] and os.path.isabs(described["model"]):
            described["model"] = os.path.basename(described["model"].rstrip("/"))
    described["server_paths_hidden"] = not trusted
    return described
