"""The service's Prometheus metrics (prometheus_client, one registry per service so that two
services in one process, e.g. tests, do not share counters): requests by endpoint and status,
latency per stage, encoder batch sizes, queue depth and wait."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ldot_jax.retrieval.batcher import Observer

# Seconds: 0.5 ms … 10 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics(Observer):
    """Counters and histograms of one service; `text()` is the /metrics page."""

    def __init__(self, depth=lambda: 0):
        self.registry = CollectorRegistry()
        self.requests = Counter("ldot_requests", "HTTP requests by endpoint and status",
                                ("endpoint", "status"), registry=self.registry)
        self.latency = Histogram("ldot_stage_seconds", "Time per request and stage (encode, "
                                 "search, rerank: the batch's; total: the request's)",
                                 ("stage",), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batches = Histogram("ldot_batch_queries", "Queries per encoder batch",
                                 buckets=BATCH_BUCKETS, registry=self.registry)
        self.wait = Histogram("ldot_queue_wait_seconds", "Time a request waited in the queue",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue = Gauge("ldot_queue_depth", "Requests waiting for the device thread",
                           registry=self.registry)
        self.queue.set_function(depth)

    def batch(self, size: int) -> None:
        self.batches.observe(size)

    def waited(self, seconds: float) -> None:
        self.wait.observe(seconds)

    def stages(self, timings_ms: dict) -> None:
        for stage in ("encode", "search", "rerank"):
            if stage in timings_ms:
                self.latency.labels(stage).observe(timings_ms[stage] / 1000)

    def text(self) -> bytes:
        return generate_latest(self.registry)
