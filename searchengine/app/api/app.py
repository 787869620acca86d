"""The HTTP API's app (FastAPI): built here, its routes in `routes/`.

The model and the library are built in the app's lifespan, in a background thread, so the
server answers at once: `/healthz` says "loading" (503) until they are ready, and so do the
routes that need them. Nothing heavy happens at import time.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles

from searchengine.app import wiring
from searchengine.app.api import errors
from searchengine.app.api import guards
from searchengine.app.api.deps import AppState, Companion, FileReads, plain_text_parameters
from searchengine.app.api.routes import explain as explain_routes
from searchengine.app.api.routes import health
from searchengine.app.api.routes import images
from searchengine.app.api.routes import ui
from searchengine.app.api.routes import library as library_routes
from searchengine.app.api.routes import search as search_routes
from searchengine.app.api.schemas import ErrorOut
from searchengine.errors import SearchEngineError
from searchengine.util.metrics import Metrics
from searchengine.service import QueryService
from searchengine.config.settings import Settings

log = logging.getLogger("searchengine.app.api")


def default_loader(settings: Settings):
    """(model, library) of an existing index, with the model it was built with by default."""

    return wiring.open_for_serving(settings)


def create_app(
    settings: Settings,
    *,
    loader: Callable[[Settings], tuple] = default_loader,
    on_ready: Callable[[QueryService], Companion | None] | None = None,
) -> FastAPI:
    """The app; `loader(settings) -> (model, library)` runs in the lifespan (tests pass their own).

    `on_ready(service)` runs once the service is up (the CLI starts a watcher there, sharing
    the loaded model) and may return a `Companion`: stopped with the app, and asked for its
    health by /healthz (a watcher that died must not leave the server saying "ok").
    """
    metrics = Metrics()
    files = FileReads(settings.file_workers, settings.file_read_timeout_s)
    state = AppState(settings, metrics, files)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def load() -> None:
            try:
                model, library = await asyncio.to_thread(loader, settings)
                service = await asyncio.to_thread(wiring.query_service, settings, model, library, metrics)
                state.service = service
                log.info("ready: %d images", library.counts()[0])
                if on_ready is not None:
                    companion = await asyncio.to_thread(on_ready, service)
                    if companion is not None:
                        state.companions.append(companion)
            except SearchEngineError as e:
                state.error = str(e) if state.service is None else f"the watcher could not start: {e}"
                log.error("cannot start: %s", e)
            except Exception as e:  # the service stays up to say what is wrong
                what = f"{type(e).__name__}: {e}"
                state.error = what if state.service is None else f"the watcher could not start: {what}"
                log.exception("cannot start")

        task = asyncio.create_task(load())
        yield
        task.cancel()
        for companion in state.companions:
            await asyncio.to_thread(companion.stop)
        files.close()
        if state.service is not None:
            await state.service.close()
            state.service.library.close()

    app = FastAPI(
        title="searchengine",
        summary="Semantic image search on BLIP-2: ITC retrieval, ITM re-ranking.",
        version="0.1.0",
        lifespan=lifespan,
        dependencies=[Depends(plain_text_parameters)],
        responses={
            400: {"model": ErrorOut, "description": "the request cannot be answered as it is; the message says what to fix"},
            401: {"model": ErrorOut, "description": "an API key is set on the server and was not sent"},
            503: {"model": ErrorOut, "description": "still loading, or the index cannot answer (the message says why)"},
        },
    )
    app.state.searchengine = state
    guards.install(app, settings, metrics)
    errors.install(app)
    app.mount("/static", StaticFiles(directory=ui.web_dir()), name="static")
    for module in (ui, health, search_routes, images, explain_routes, library_routes):
        app.include_router(module.router)
    return app
