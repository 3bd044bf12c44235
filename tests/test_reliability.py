"""Faults, overload and public exposure: every task keeps exactly one result."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import websockets
from websockets.sync.client import connect

from conftest import ROOT, affine
from gpu_worker.client import ModelClient
from gpu_worker.model import load_model
from gpu_worker.models.testing import AffineModel
from openpi_style_server import OpenpiStyleServer
from pi0_reward_server.app import create_app
from pi0_reward_server.client_pool import ClientPool
from pi0_reward_server.kinds.registry import run_tasks
from pi0_reward_server.policies import LocalPolicy
from pi0_reward_server.kinds.registry import Limits, parse_task

CARTPOLE_ARGS = ("--model", "cartpole=gpu_worker.models.cartpole:CartPolePolicy")


def expected_scores(tasks: list) -> list[float]:
    model = load_model("gpu_worker.models.cartpole:CartPolePolicy", None, device="cpu")
    parsed = [parse_task(i, t, {}, Limits()) for i, t in enumerate(tasks)]
    return [r.score for r in run_tasks(parsed, lambda name: LocalPolicy({"cartpole": model}, "cartpole", name),
                                       max_workers=4, failure_score=0.0)]


def fast_app(**overrides):
    base = dict(health_interval_s=0.2, backoff_initial_s=0.1, backoff_max_s=0.5, log_level="WARNING")
    return create_app({**base, **overrides})


def in_thread(fn, *args):
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=fn(*args)), daemon=True)
    thread.start()
    return thread, box


@pytest.mark.slow
def test_model_server_killed_mid_score_loses_no_task_and_rejoins_after_restart(cli_server):
    a, b = cli_server(*CARTPOLE_ARGS), cli_server(*CARTPOLE_ARGS)
    a.wait_healthy()
    b.wait_healthy()
    app = fast_app(model_servers=(a.url, b.url))
    pool: ClientPool = app.extensions["client_pool"]
    assert pool.wait_for_servers(2, 10)
    tasks = [{"task": "cartpole", "episodes": 2, "seed": i} for i in range(24)]
    thread, box = in_thread(lambda: app.test_client().post("/score", json={"responses": tasks,
                                                                          "reward_function_kwargs": {"max_workers": 8}}))
    deadline = time.monotonic() + 60
    while min(s["requests"] for s in pool.status()["servers"]) < 20:  # both servers are working
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert pool.status()["totals"]["in_flight"] > 0
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    thread.join(300)
    response = box["result"]
    assert response.status_code == 200
    body = response.get_json()
    assert body["failures"] == 0 and len(body["scores"]) == 24
    assert all(d["error"] is None for d in body["details"])
    assert body["scores"] == expected_scores(tasks)
    status = app.test_client().get("/pool_status").get_json()
    assert status["servers"][0]["state"] == "down" and status["servers"][1]["state"] == "up"

    restarted = cli_server(*CARTPOLE_ARGS, "--port", str(a.port))  # same address, new process
    restarted.wait_healthy()
    assert pool.wait_for_servers(2, 30), pool.status()
    before = pool.status()["servers"][0]["requests"]
    again = app.test_client().post("/score", json={"responses": ["cartpole_short"] * 4,
                                                  "reward_function_kwargs": {"max_workers": 4, "episodes": 2}})
    assert again.status_code == 200 and again.get_json()["failures"] == 0
    assert pool.status()["servers"][0]["requests"] > before  # it took work again, no app restart
    pool.close()


def test_hung_model_server_is_timed_out_and_its_work_done_elsewhere(start_server):
    hung = OpenpiStyleServer(hang=True).start()
    try:
        good = start_server(log_level="WARNING")
        app = fast_app(model_servers=(hung.url, good.url), request_timeout_s=0.5, health_interval_s=60)
        assert app.extensions["client_pool"].wait_for_servers(2, 10)
        response = app.test_client().post("/score", json={"responses": ["cartpole_short"] * 4,
                                                          "reward_function_kwargs": {"max_workers": 4, "episodes": 2}})
        body = response.get_json()
        assert response.status_code == 200 and body["failures"] == 0 and body["scores"] == [1.0] * 4
        hung_status = app.extensions["client_pool"].status()["servers"][0]
        assert hung_status["errors"] >= 1 and "no reply within 0.5s" in hung_status["last_error"]
        app.extensions["client_pool"].close()
    finally:
        hung.stop()


def test_overloaded_server_is_avoided_by_the_pool(start_server):
    busy = start_server(models=(affine(gated=True),), max_wait_ms=0, max_queue=1)
    spare = start_server(models=(affine(),))
    holder, queued = ModelClient(busy.url), ModelClient(busy.url)
    t1, _ = in_thread(holder.infer, {"observation/state": np.array([1.0], np.float32)})
    assert AffineModel.entered.wait(10)
    t2, _ = in_thread(queued.infer, {"observation/state": np.array([2.0], np.float32)})
    deadline = time.monotonic() + 10
    while busy.server.models["affine"].batcher.queued_rows < 1:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    with ClientPool([busy.url, spare.url], health_interval_s=60).start() as pool:
        assert pool.wait_for_servers(2, 10)
        reply, url = pool.infer({"observation/state": np.array([5.0], np.float32)}, prefer=busy.url)
        assert url == spare.url and reply["actions"][0] == 11
        busy_status = pool.status()["servers"][0]
        assert busy_status["errors"] == 1 and busy_status["last_error"].startswith("overloaded")
    AffineModel.gate.set()
    t1.join(10)
    t2.join(10)


def test_app_refuses_work_beyond_its_bound_with_429_and_retry_after(start_server):
    server = start_server(models=(affine(gated=True),), max_wait_ms=0)
    app = fast_app(model_servers=(server.url,), max_inflight_tasks=2)
    tasks = {"responses": [{"env": "CartPole-v1", "episodes": 1, "max_steps": 3, "model": "affine",
                            "return_range": [0, 10]}] * 2}
    # AffineModel's 'actions' for CartPole: 2x+1 of a 4-vector; the task fails fast with a shape error or scores.
    thread, box = in_thread(lambda: app.test_client().post("/score", json=tasks))
    assert AffineModel.entered.wait(10)  # both tasks are admitted and waiting on the model
    assert app.extensions["admission"].inflight == 2
    refused = app.test_client().post("/score", json={"responses": ["cartpole_short"]})
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "5"
    assert "max_inflight_tasks=2" in refused.get_json()["error"]
    AffineModel.gate.set()
    thread.join(60)
    assert box["result"].status_code == 200
    assert app.extensions["admission"].inflight == 0
    app.extensions["client_pool"].close()


def test_token_never_appears_in_logs(start_server, caplog):
    token = "tok-" + "x7" * 12
    server = start_server(log_level="WARNING")
    app = fast_app(model_servers=(server.url,), token=token, log_level="DEBUG")
    client = app.test_client()
    with caplog.at_level(logging.DEBUG):
        client.post("/score", json={"responses": ["cartpole_short"]}, headers={"Authorization": "Bearer " + token[::-1]})
        client.post("/score", json={"responses": ["cartpole_short"], "reward_function_kwargs": {"episodes": 1}},
                    headers={"Authorization": "Bearer " + token})
        client.get("/pool_status", headers={"Authorization": "Bearer " + token})
        client.post("/score", data="{bad json", headers={"Authorization": "Bearer " + token})
    assert token not in caplog.text and token[::-1] not in caplog.text
    health = client.get("/health").get_json()
    assert set(health) == {"status", "model_servers_up"}  # nothing sensitive
    app.extensions["client_pool"].close()


def test_model_server_api_key(start_server, monkeypatch):
    key = "model-key-1234"
    server = start_server(models=(affine(),), api_key=key)
    with pytest.raises(websockets.InvalidStatus) as excinfo:
        connect(server.url, open_timeout=5)
    assert excinfo.value.response.status_code == 401
    with pytest.raises(websockets.InvalidStatus):
        ModelClient(server.url, api_key="wrong-key-000")
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz") as response:
        assert response.status == 200  # health stays open for orchestration
    with ModelClient(server.url, api_key=key) as client:
        assert client.infer({"observation/state": np.array([1.0], np.float32)})["actions"][0] == 3
    monkeypatch.setenv("MODEL_SERVER_API_KEY", key)
    app = fast_app(model_servers=(server.url,))
    assert app.extensions["client_pool"].wait_for_servers(1, 10)
    reply, _ = app.extensions["client_pool"].infer({"observation/state": np.array([2.0], np.float32)})
    assert reply["actions"][0] == 5
    app.extensions["client_pool"].close()


def test_model_servers_bind_to_loopback_by_default(cli_server):
    server = cli_server(*CARTPOLE_ARGS)
    assert re.search(r"listening on ws://127\.0\.0\.1:\d+", server.log())


@pytest.mark.slow
def test_sigterm_to_gunicorn_finishes_in_flight_score(start_server, tmp_path):
    a, b = start_server(log_level="WARNING"), start_server(log_level="WARNING")
    log_path = tmp_path / "gunicorn.log"
    env = {**os.environ, "MODEL_SERVERS": f"{a.url},{b.url}", "GUNICORN_BIND": "127.0.0.1:0",
           "GUNICORN_GRACEFUL_TIMEOUT": "120", "REWARD_LOG_LEVEL": "WARNING"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "pi0_reward_server/gunicorn_config.py",
                                 "pi0_reward_server.app:create_app()"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        port = None
        while port is None:
            assert time.monotonic() < deadline, log_path.read_text()
            match = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", log_path.read_text())
            port = int(match.group(1)) if match else None
            time.sleep(0.1)
        base = f"http://127.0.0.1:{port}"
        while True:
            try:
                if json.load(urllib.request.urlopen(f"{base}/health", timeout=5))["model_servers_up"] == 2:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        tasks = [{"task": "cartpole", "episodes": 2, "seed": i} for i in range(6)]
        body = json.dumps({"responses": tasks, "reward_function_kwargs": {"max_workers": 2}}).encode()
        request = urllib.request.Request(f"{base}/score", data=body, headers={"Content-Type": "application/json"})
        thread, box = in_thread(lambda: json.load(urllib.request.urlopen(request, timeout=300)))
        while json.load(urllib.request.urlopen(f"{base}/pool_status"))["totals"]["requests"] < 10:
            assert time.monotonic() < deadline + 60
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        thread.join(300)
        result = box["result"]
        assert result["failures"] == 0 and result["scores"] == expected_scores(tasks)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
