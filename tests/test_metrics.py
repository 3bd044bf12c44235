"""Prometheus metrics scraped from real servers under real load, parsed with prometheus-client's own parser:
the model server's counters, batch sizes and errors; the reward app's requests, tasks and pool, in one
process and added up across two gunicorn workers."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import affine
from gpu_worker.client import ModelClient, ServerError
from gpu_worker.config import ModelConfig
from gpu_worker.models.testing import AffineModel

CARTPOLE = ModelConfig.parse("cartpole=gpu_worker.models.cartpole:CartPolePolicy")
STATE = {"observation/state": np.array([0.5, 1.0], np.float32)}


def scrape(url: str, headers: dict | None = None) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} from a /metrics endpoint."""
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.02)


def metrics_url(server) -> str:
    return f"http://127.0.0.1:{server.port}/metrics"


def test_model_server_counts_requests_rows_and_batches_under_load(start_server):
    server = start_server(models=(affine(),), log_level="WARNING")
    before = scrape(metrics_url(server))
    errors: list = []

    def client(n: int) -> None:
        try:
            with ModelClient(server.url) as conn:
                for _ in range(n):
                    conn.infer(STATE)
                conn.infer_batch([STATE] * 3)  # one request of 3 rows
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(25,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    after = scrape(metrics_url(server))
    assert value(after, "gpu_worker_requests_total", model="affine") - \
        value(before, "gpu_worker_requests_total", model="affine") == 4 * 26
    assert value(after, "gpu_worker_rows_total", model="affine") - \
        value(before, "gpu_worker_rows_total", model="affine") == 4 * 28
    batches = value(after, "gpu_worker_batches_total", model="affine")
    assert value(after, "gpu_worker_batch_rows_count", model="affine") == batches
    assert value(after, "gpu_worker_batch_rows_sum", model="affine") == 4 * 28
    assert value(after, "gpu_worker_queue_wait_seconds_count", model="affine") == 4 * 26
    assert value(after, "gpu_worker_inference_seconds_count", model="affine") == batches
    assert value(after, "gpu_worker_model_info", model="affine", version="affine-1", device="cpu", checkpoint="") == 1
    assert value(after, "gpu_worker_open_connections") == 0


def test_batch_size_histogram_sees_batches_larger_than_one_under_concurrency(start_server):
    server = start_server(models=(affine(gated=True),), log_level="WARNING")
    conns = [ModelClient(server.url) for _ in range(6)]
    try:
        threads = [threading.Thread(target=c.infer, args=(STATE,)) for c in conns]
        threads[0].start()
        assert AffineModel.entered.wait(10)  # the model is busy with the first: the rest queue up
        for t in threads[1:]:
            t.start()
        wait_for(lambda: value(scrape(metrics_url(server)), "gpu_worker_queue_requests", model="affine") == 5)
        during = scrape(metrics_url(server))
        assert value(during, "gpu_worker_queue_rows", model="affine") == 5
        assert value(during, "gpu_worker_open_connections") == 6
        AffineModel.gate.set()
        for t in threads:
            t.join(30)
    finally:
        for c in conns:
            c.close()
    after = scrape(metrics_url(server))
    assert value(after, "gpu_worker_batches_total", model="affine") == 2  # 1, then the 5 queued in one batch
    assert value(after, "gpu_worker_batch_rows_bucket", model="affine", le="1.0") == 1
    assert value(after, "gpu_worker_batch_rows_bucket", model="affine", le="4.0") == 1
    assert value(after, "gpu_worker_batch_rows_bucket", model="affine", le="8.0") == 2


def test_errors_are_counted_by_kind(start_server):
    server = start_server(models=(affine(gated=True, fail_on_negative=True),), max_queue=1, log_level="WARNING")
    with ModelClient(server.url) as busy, ModelClient(server.url) as queued, ModelClient(server.url) as late:
        first = threading.Thread(target=busy.infer, args=(STATE,))
        first.start()
        assert AffineModel.entered.wait(10)
        second = threading.Thread(target=queued.infer, args=(STATE,))
        second.start()
        wait_for(lambda: value(scrape(metrics_url(server)), "gpu_worker_queue_rows", model="affine") == 1)
        with pytest.raises(ServerError, match="overloaded"):
            late.infer(STATE)  # the queue is full
        AffineModel.gate.set()
        first.join(10)
        second.join(10)
        with pytest.raises(ServerError, match="failed"):
            late.infer({"observation/state": np.array([-1.0], np.float32)})
        assert "text frames" in late.send_raw("hello")
        with pytest.raises(ServerError, match="bad request"):
            late.infer({"observation/wrong": STATE["observation/state"]})
    samples = scrape(metrics_url(server))
    assert {kind: value(samples, "gpu_worker_errors_total", kind=kind)
            for kind in ("overloaded", "model_error", "bad_request", "shutting_down")} == \
        {"overloaded": 1, "model_error": 1, "bad_request": 2, "shutting_down": 0}
    assert value(samples, "gpu_worker_requests_total", model="affine") == 2


def test_model_server_metrics_need_the_api_key_unless_made_public(start_server):
    keyed = start_server(models=(affine(),), api_key="k" * 16, log_level="WARNING")
    with pytest.raises(urllib.error.HTTPError) as refused:
        scrape(metrics_url(keyed))
    assert refused.value.code == 401
    assert value(scrape(metrics_url(keyed), {"Authorization": f"Api-Key {'k' * 16}"}),
                 "gpu_worker_requests_total", model="affine") == 0
    public = start_server(models=(affine(),), api_key="k" * 16, metrics_public=True, log_level="WARNING")
    assert ("gpu_worker_open_connections", ()) in scrape(metrics_url(public))


def test_reward_app_counts_requests_tasks_and_pool_round_trips(start_server, make_app):
    server = start_server(models=(CARTPOLE,), log_level="WARNING")
    client = make_app(model_servers=(server.url,), token="t" * 16).test_client()
    auth = {"Authorization": f"Bearer {'t' * 16}"}

    def samples() -> dict:
        response = client.get("/metrics", headers=auth)
        assert response.status_code == 200 and response.content_type.startswith("text/plain; version=0.0.4")
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(response.get_data(as_text=True))
                for s in family.samples}

    assert client.get("/metrics").status_code == 401
    before = samples()
    body = {"responses": [{"task": "cartpole_short", "episodes": 1, "seed": s} for s in range(3)]}
    for _ in range(2):
        assert client.post("/score", json=body, headers=auth).status_code == 200
    assert client.post("/score", json={"responses": ["chess"]}, headers=auth).status_code == 400
    after = samples()

    def delta(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("reward_http_requests_total", route="/score", method="POST", status="200") == 2
    assert delta("reward_http_requests_total", route="/score", method="POST", status="400") == 1
    assert delta("reward_jobs_submitted_total", via="score") == 2
    assert delta("reward_jobs_total", state="done") == 2
    assert delta("reward_tasks_total", kind="gym", outcome="ok") == 3  # the second request: from the cache
    assert delta("reward_tasks_total", kind="gym", outcome="cached") == 3
    assert delta("reward_task_score_count", kind="gym") == 3
    assert delta("reward_pool_requests_total", server=server.url) == \
        delta("reward_pool_request_seconds_count", server=server.url) > 0
    assert delta("reward_http_request_seconds_count", route="/score") == 3


def test_two_gunicorn_workers_metrics_add_up(start_server, tmp_path):
    from test_gunicorn_edges import Gunicorn

    server = start_server(models=(CARTPOLE,), log_level="WARNING")
    app = Gunicorn(tmp_path, {"MODEL_SERVERS": server.url, "GUNICORN_WORKERS": "2", "GUNICORN_THREADS": "4"})
    try:
        workers, sent = set(), 0
        body = json.dumps({"responses": [{"task": "cartpole_short", "episodes": 1}],
                           "reward_function_kwargs": {"cache": False}}).encode()
        while len(workers) < 2 or sent < 6:  # until both workers have answered some
            status, headers, _ = app.request("POST", "/score", body, {"Content-Type": "application/json"})
            assert status == 200
            workers.add(headers["X-Reward-Worker"])
            sent += 1
            assert sent < 200, "one worker took every request"
        scraped = []
        for _ in range(4):  # whichever worker answers the scrape answers for both
            status, headers, text = app.request("GET", "/metrics")
            assert status == 200
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for family in text_string_to_metric_families(text.decode()) for s in family.samples}
            scraped.append((headers["X-Reward-Worker"], samples))
        for _, samples in scraped:
            assert value(samples, "reward_http_requests_total", route="/score", method="POST", status="200") == sent
            assert value(samples, "reward_tasks_total", kind="gym", outcome="ok") == sent
            assert value(samples, "reward_jobs_submitted_total", via="score") == sent
    finally:
        app.stop()
