"""Is the service up, and how is it doing: /healthz and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from searchengine.app.api.deps import State
from searchengine.app.api.schemas import HealthOut

router = APIRouter()


@router.get("/healthz", response_model=HealthOut, responses={503: {"model": HealthOut}})
def healthz(state: State):
    """Ready (200) once the model and the index are loaded; 503 while loading or broken."""
    problem = state.problem()
    if state.service is not None and problem is None:
        return HealthOut(status="ok")
    status = "error" if problem else "loading"
    return JSONResponse(HealthOut(status=status, error=problem).model_dump(), status_code=503)


@router.get("/metrics", response_class=Response)
def prometheus(state: State):
    """Prometheus metrics: requests, latency per route and per search stage, index size."""
    if state.service is not None:
        state.service.update_gauges()
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
