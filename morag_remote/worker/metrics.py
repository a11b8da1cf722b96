"""The worker's Prometheus metrics (``--metrics-port``), in a registry of its own."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.running = Gauge("morag_remote_worker_jobs_running", "jobs this worker runs now",
                             registry=self.registry)
        self.finished = Counter("morag_remote_worker_jobs_finished_total",
                                "jobs this worker finished, by outcome", ["outcome"], registry=self.registry)
        self.handler_seconds = Histogram("morag_remote_worker_handler_seconds", "handler run time",
                                         ["content_type"], registry=self.registry,
                                         buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 1800, 3600, 7200, float("inf")))
        self.download_bytes = Counter("morag_remote_worker_download_bytes_total", "source bytes downloaded",
                                      registry=self.registry)
        self.http_retries = Counter("morag_remote_worker_http_retries_total", "requests retried, by reason",
                                    ["reason"], registry=self.registry)

    def serve(self, port: int, host: str) -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def on_retry(self, method: str, path: str, reason: str) -> None:
        self.http_retries.labels(reason=reason).inc()
