"""The search UI: static files served by `searchengine serve` at `/` (no build step)."""
