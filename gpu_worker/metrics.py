"""Prometheus metrics of one model server, served as ``GET /metrics`` on its port.

Each server has a registry of its own (several servers can live in one process: tests, embedding). Counters
and histograms are updated where the work happens (the batcher thread per batch, the event loop per
request); gauges (queue depth, connections) and the model info are read when the metrics are scraped.

Names follow Prometheus conventions (``_total`` counters, ``_seconds`` durations in base units):

* ``gpu_worker_requests_total{model}``, ``gpu_worker_rows_total{model}``: answered requests and their rows
* ``gpu_worker_batches_total{model}``, ``gpu_worker_batch_rows{model}`` (histogram): forward passes and their sizes
* ``gpu_worker_queue_wait_seconds{model}``, ``gpu_worker_inference_seconds{model}`` (histograms)
* ``gpu_worker_queue_requests{model}``, ``gpu_worker_queue_rows{model}`` (gauges): waiting now
* ``gpu_worker_errors_total{kind}``: ``bad_request``, ``overloaded``, ``model_error``, ``shutting_down``
* ``gpu_worker_open_connections`` (gauge), ``gpu_worker_model_info{model, version, device, checkpoint}`` (1)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

if TYPE_CHECKING:
    from gpu_worker.server import ModelServer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ERROR_KINDS = ("bad_request", "overloaded", "model_error", "shutting_down")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _Live:
    """Gauges read from the server at scrape time."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server

    def collect(self) -> Iterable:
        queue_requests = GaugeMetricFamily("gpu_worker_queue_requests", "Requests waiting for a batch.",
                                           labels=["model"])
        queue_rows = GaugeMetricFamily("gpu_worker_queue_rows", "Rows waiting for a batch.", labels=["model"])
        info = InfoMetricFamily("gpu_worker_model", "The hosted model serving now.",
                                labels=["model", "version", "device", "checkpoint"])
        for name, hosted in list(self.server.models.items()):
            queue_requests.add_metric([name], hosted.batcher.queued_requests)
            queue_rows.add_metric([name], hosted.batcher.queued_rows)
            info.add_metric([name, hosted.version, str(self.server.device), str(hosted.checkpoint or "")], {})
        connections = GaugeMetricFamily("gpu_worker_open_connections", "Open WebSocket connections.")
        connections.add_metric([], self.server.open_connections)
        return [queue_requests, queue_rows, info, connections]


class ServerMetrics:
    def __init__(self, server: ModelServer) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("gpu_worker_requests", "Requests answered with actions.", ["model"],
                                registry=self.registry)
        self.rows = Counter("gpu_worker_rows", "Observation rows answered.", ["model"], registry=self.registry)
        self.batches = Counter("gpu_worker_batches", "Forward passes run.", ["model"], registry=self.registry)
        self.batch_rows = Histogram("gpu_worker_batch_rows", "Rows per forward pass.", ["model"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("gpu_worker_queue_wait_seconds", "Time a request waited for its batch.",
                                    ["model"], buckets=SECONDS_BUCKETS, registry=self.registry)
        self.inference = Histogram("gpu_worker_inference_seconds", "Time of one forward pass.", ["model"],
                                   buckets=SECONDS_BUCKETS, registry=self.registry)
        self.errors = Counter("gpu_worker_errors", "Requests answered with an error, by kind.", ["kind"],
                              registry=self.registry)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)  # present at 0 from the start: a rate needs a first sample
        self.registry.register(_Live(server))
        self._answered: dict[str, tuple] = {}

    def observer(self, model: str) -> Callable[[int, float, list[float]], None]:
        """The batcher's per-batch callback: (rows, inference seconds, each request's queue wait)."""
        batches, batch_rows = self.batches.labels(model), self.batch_rows.labels(model)
        inference, queue_wait = self.inference.labels(model), self.queue_wait.labels(model)

        def observe(rows: int, infer_s: float, waits: list[float]) -> None:
            batches.inc()
            batch_rows.observe(rows)
            inference.observe(infer_s)
            for wait in waits:
                queue_wait.observe(wait)

        return observe

    def answered(self, model: str, rows: int) -> None:
        children = self._answered.get(model)
        if children is None:  # labels() costs a lock and a lookup: once per model, not per request
            children = self._answered[model] = (self.requests.labels(model), self.rows.labels(model))
        children[0].inc()
        children[1].inc(rows)

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
