"""What ``GET /metrics`` reports, in Prometheus' text format (prometheus-client, the serve extra).

Each app has its own registry (two servers in one process, as the tests start them, never share counts):

- ``nnctl_serve_requests_total{endpoint, status}``: answered requests (499: the client left before its body
  was sent whole; nobody saw that answer)
- ``nnctl_serve_request_seconds{endpoint}``: latency, from the request's start to its answer
- ``nnctl_serve_queue_wait_seconds``: how long a /predict request waited for the inference worker
- ``nnctl_serve_batch_size``: the samples of each forward pass (a sum above the count of passes: batching)
- ``nnctl_serve_in_flight``: requests being answered now; ``nnctl_serve_queue_depth``: requests queued
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("nnctl_serve_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("nnctl_serve_request_seconds", "Seconds from a request's start to its answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("nnctl_serve_queue_wait_seconds", "Seconds a /predict request waited for "
                                    "the inference worker", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("nnctl_serve_batch_size", "Samples in each forward pass", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.in_flight = Gauge("nnctl_serve_in_flight", "Requests being answered", registry=r)
        self.queue_depth = Gauge("nnctl_serve_queue_depth", "Requests waiting for the inference worker", registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)
