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

import bisect
import math
from typing import TYPE_CHECKING, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily)
from prometheus_client.utils import floatToGoString

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


class _Histogram:
    """Bucket counts kept as plain numbers. ``observe`` is a bisect and two additions: prometheus_client's
    Histogram scans its buckets in Python and takes a lock per update, several microseconds a request on
    the serving path, where a forward pass of a small model takes tens. Each histogram is written by one
    thread at a time (the thread running that model's batch: the batcher's or, inline, the event loop's);
    a scrape reads it as it stands."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        buckets, running = [], 0
        for bound, count in zip(list(self.bounds) + [math.inf], list(self.counts)):
            running += count
            buckets.append((floatToGoString(bound), running))
        return buckets


class _ModelStats:
    """One hosted model's counters and histograms (see :class:`_Histogram` for who writes them)."""

    __slots__ = ("requests", "rows", "batches", "batch_rows", "queue_wait", "inference")

    def __init__(self) -> None:
        self.requests = 0
        self.rows = 0
        self.batches = 0
        self.batch_rows = _Histogram(BATCH_BUCKETS)
        self.queue_wait = _Histogram(SECONDS_BUCKETS)
        self.inference = _Histogram(SECONDS_BUCKETS)


class _Served:
    """The per-model counters and histograms, turned into metric families at scrape time."""

    def __init__(self, stats: dict[str, _ModelStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterable:
        families = {
            "requests": CounterMetricFamily("gpu_worker_requests", "Requests answered with actions.", labels=["model"]),
            "rows": CounterMetricFamily("gpu_worker_rows", "Observation rows answered.", labels=["model"]),
            "batches": CounterMetricFamily("gpu_worker_batches", "Forward passes run.", labels=["model"]),
        }
        histograms = {
            "batch_rows": HistogramMetricFamily("gpu_worker_batch_rows", "Rows per forward pass.", labels=["model"]),
            "queue_wait": HistogramMetricFamily("gpu_worker_queue_wait_seconds", "Time a request waited for its batch.",
                                                labels=["model"]),
            "inference": HistogramMetricFamily("gpu_worker_inference_seconds", "Time of one forward pass.",
                                               labels=["model"]),
        }
        for model, stats in list(self.stats.items()):
            for key, family in families.items():
                family.add_metric([model], getattr(stats, key))
            for key, family in histograms.items():
                histogram = getattr(stats, key)
                family.add_metric([model], histogram.cumulative(), histogram.total)
        return [*families.values(), *histograms.values()]


class ServerMetrics:
    def __init__(self, server: ModelServer) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.errors = Counter("gpu_worker_errors", "Requests answered with an error, by kind.", ["kind"],
                              registry=self.registry)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)  # present at 0 from the start: a rate needs a first sample
        self._stats: dict[str, _ModelStats] = {}
        self.registry.register(_Served(self._stats))
        self.registry.register(_Live(server))

    def _model(self, model: str) -> _ModelStats:
        stats = self._stats.get(model)
        if stats is None:
            stats = self._stats[model] = _ModelStats()
        return stats

    def observer(self, model: str) -> Callable[[int, float, list[float]], None]:
        """The batcher's per-batch callback: (rows, inference seconds, each request's queue wait)."""
        stats = self._model(model)

        def observe(rows: int, infer_s: float, waits: list[float]) -> None:
            stats.batches += 1
            stats.batch_rows.observe(rows)
            stats.inference.observe(infer_s)
            for wait in waits:
                stats.queue_wait.observe(wait)

        return observe

    def answered(self, model: str, rows: int) -> None:
        """A request answered with actions; called on the event loop only."""
        stats = self._stats.get(model) or self._model(model)
        stats.requests += 1
        stats.rows += rows

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
