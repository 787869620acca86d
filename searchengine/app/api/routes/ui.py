"""The search page (its scripts are served from /static)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

router = APIRouter()


def web_dir() -> Path:
    """The UI's files: the repo's web/ folder, installed as package data of `searchengine_web`."""
    spec = importlib.util.find_spec("searchengine_web")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the web UI files are missing: reinstall searchengine")
    return Path(list(spec.submodule_search_locations)[0])


@router.get("/", include_in_schema=False)
def index():
    """The search page."""
    return FileResponse(web_dir() / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})
