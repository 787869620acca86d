"""Prometheus metrics of one app (its own registry, so tests and several apps don't collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "searchengine_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "searchengine_request_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.stage = Histogram(
            "searchengine_stage_seconds", "Search stage latency", ["stage"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.batch_size = Histogram(
            "searchengine_text_batch_size", "Queries per text-encoder call", buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry
        )
        self.images = Gauge("searchengine_index_images", "Images in the vector index", registry=self.registry)
        self.vectors = Gauge("searchengine_index_vectors", "Vectors in the vector index", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
