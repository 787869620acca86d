"""The HTTP API, in the FastAPI template's shape: `app` builds it, `deps` hands routes what
they need, `schemas` says what goes in and out, `errors` maps exceptions to statuses by type,
`guards` refuses what no route should see, `routes/` holds the routes by area."""

from searchengine.app.api.app import create_app, default_loader
from searchengine.app.api.schemas import HitOut, SearchOut

__all__ = ["create_app", "default_loader", "HitOut", "SearchOut"]
