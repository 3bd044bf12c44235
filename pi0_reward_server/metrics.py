"""Prometheus metrics of the reward app, served as ``GET /metrics`` (behind the token when one is set).

Under gunicorn every worker is its own process: the metrics use prometheus-client's multiprocess mode, in
the directory named by ``PROMETHEUS_MULTIPROC_DIR`` (created empty by ``gunicorn_config.py`` before the
workers start; a dead worker's live gauges are dropped by its ``child_exit`` hook), so any worker's
``/metrics`` answers for all of them: counters add up across workers. In one process (Flask's server,
tests) the default registry serves.

* ``reward_http_requests_total{route, method, status}``, ``reward_http_request_seconds{route}``
* ``reward_jobs_submitted_total{via}`` (``score``, ``jobs``, ``openrlhf``), ``reward_jobs_total{state}`` (ended)
* ``reward_tasks_total{kind, outcome}`` (``ok``, ``failed``, ``cached``), ``reward_task_seconds{kind}``,
  ``reward_task_score{kind}`` (histograms)
* ``reward_pool_requests_total{server}``, ``reward_pool_errors_total{server}``,
  ``reward_pool_retries_total{server}``, ``reward_pool_request_seconds{server}`` (histogram)
* ``reward_pool_server_up{server}`` (each live worker's view; the minimum), ``reward_pool_server_in_flight``
  (summed over workers)
* ``reward_admission_rejections_total{reason}`` (``busy``, ``no_model_server``, ``store``),
  ``reward_inflight_tasks`` (summed over workers)
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
TASK_SECONDS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
SCORES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

http_requests = Counter("reward_http_requests", "HTTP requests answered.", ["route", "method", "status"])
http_seconds = Histogram("reward_http_request_seconds", "Time to answer an HTTP request.", ["route"],
                         buckets=SECONDS)
jobs_submitted = Counter("reward_jobs_submitted", "Work submitted, by route.", ["via"])
jobs_ended = Counter("reward_jobs", "Jobs ended, by final state.", ["state"])
tasks = Counter("reward_tasks", "Tasks ended, by kind and outcome.", ["kind", "outcome"])
task_seconds = Histogram("reward_task_seconds", "Time a task ran.", ["kind"], buckets=TASK_SECONDS)
task_score = Histogram("reward_task_score", "Scores of tasks that did not fail.", ["kind"], buckets=SCORES)
pool_requests = Counter("reward_pool_requests", "Model-server round trips answered.", ["server"])
pool_errors = Counter("reward_pool_errors", "Errors counted against the model server (as /pool_status counts them).",
                      ["server"])
pool_retries = Counter("reward_pool_retries", "Round trips retried after this server failed them.", ["server"])
pool_seconds = Histogram("reward_pool_request_seconds", "Model-server round-trip time.", ["server"],
                         buckets=SECONDS)
pool_up = Gauge("reward_pool_server_up", "1 while the model server is in rotation.", ["server"],
                multiprocess_mode="livemin")
pool_in_flight = Gauge("reward_pool_server_in_flight", "Round trips in flight to the model server.", ["server"],
                       multiprocess_mode="livesum")
admission_rejections = Counter("reward_admission_rejections", "Work refused before it ran.", ["reason"])
inflight_tasks = Gauge("reward_inflight_tasks", "Tasks admitted and not yet ended.", multiprocess_mode="livesum")

for _reason in ("busy", "no_model_server", "store"):
    admission_rejections.labels(_reason)


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def registry() -> CollectorRegistry:
    if not multiprocess():
        return REGISTRY
    from prometheus_client import multiprocess as mp

    collected = CollectorRegistry()
    mp.MultiProcessCollector(collected)
    return collected


def render() -> bytes:
    return generate_latest(registry())


def forget_server(url: str) -> None:
    """A model server left the pool: its per-server gauges go (in multiprocess mode, where series cannot be
    removed, they read 0)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"):
        pool_up.labels(url).set(0)
        pool_in_flight.labels(url).set(0)
    else:
        pool_up.remove(url)
        pool_in_flight.remove(url)


def observe_pool(status: dict[str, Any]) -> None:
    """The pool's view, from its health thread: each server's state and load."""
    for server in status["servers"]:
        pool_up.labels(server["url"]).set(1 if server["state"] == "up" else 0)
        pool_in_flight.labels(server["url"]).set(server["in_flight"])


def task_ended(kind: str, detail: dict[str, Any]) -> None:
    outcome = "cached" if detail.get("cached") else ("failed" if detail.get("error") else "ok")
    tasks.labels(kind, outcome).inc()
    if outcome == "ok":
        task_seconds.labels(kind).observe(float(detail.get("seconds") or 0.0))
        task_score.labels(kind).observe(float(detail["score"]))


def server_totals() -> dict[str, dict[str, float]]:
    """Round trips and errors per model server, across workers: ``{url: {"requests": n, "errors": n}}``."""
    out: dict[str, dict[str, float]] = {}
    for family in registry().collect():
        for sample in family.samples:
            if sample.name in ("reward_pool_requests_total", "reward_pool_errors_total"):
                key = "requests" if sample.name == "reward_pool_requests_total" else "errors"
                entry = out.setdefault(sample.labels["server"], {"requests": 0.0, "errors": 0.0})
                entry[key] += sample.value
    return out


def totals() -> dict[str, float]:
    """Counter totals across workers, for the dashboard: tasks by outcome, jobs by state, /score requests."""
    out: dict[str, float] = {}
    for family in registry().collect():
        for sample in family.samples:
            if sample.name == "reward_tasks_total":
                key = f"tasks_{sample.labels['outcome']}"
            elif sample.name == "reward_jobs_total":
                key = f"jobs_{sample.labels['state']}"
            elif sample.name == "reward_http_requests_total" and sample.labels.get("route") == "/score":
                key = "score_requests"
            elif sample.name == "reward_pool_requests_total":
                key = "model_requests"
            else:
                continue
            out[key] = out.get(key, 0.0) + sample.value
    return out
