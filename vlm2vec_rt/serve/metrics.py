"""Prometheus metrics of the embeddings server, in a registry of their own (one per app, so several servers
in one process, as in the tests, do not collide)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 65536)


class Metrics:
    """The server's counters, gauges and histograms; `render()` gives the Prometheus text exposition."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "vlm2vec_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "vlm2vec_request_duration_seconds",
            "HTTP request latency, first byte in to response sent",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "vlm2vec_queue_depth",
            "items admitted and not yet answered (being prepared, queued, or in a model call)",
            registry=r,
        )
        self.queue_seconds = Histogram(
            "vlm2vec_queue_wait_seconds",
            "time an item waited in the batcher's queue before its model call began",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_items = Histogram(
            "vlm2vec_batch_size", "items per model call", buckets=COUNT_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "vlm2vec_batch_requests",
            "requests whose items share one model call (above 1: cross-request batching)",
            buckets=COUNT_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "vlm2vec_batch_padded_tokens",
            "padded tokens per model call (items x the longest)",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.model_seconds = Histogram(
            "vlm2vec_model_call_duration_seconds",
            "duration of one model call (collate + vision + decoder)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.items = Counter("vlm2vec_items", "items embedded", registry=r)
        self.tokens = Counter("vlm2vec_tokens", "tokens embedded (text and image tokens)", registry=r)
        self.images = Counter("vlm2vec_images", "images embedded", registry=r)
        # resident memory and CPU time: what shows that memory stays flat under load
        ProcessCollector(registry=r)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
