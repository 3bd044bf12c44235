"""The reward app end to end: real model servers, the Flask test client and a real gunicorn."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import ROOT
from gpu_worker.model import load_model
from pi0_reward_server.kinds.registry import run_tasks
from pi0_reward_server.policies import LocalPolicy
from pi0_reward_server.kinds.registry import Limits, parse_task

EIGHT_TASKS = ["cartpole", "cartpole_short", {"task": "gym:CartPole-v1", "episodes": 3, "seed": 7},
               {"task": "cartpole", "max_steps": 50, "success_threshold": 40}, "cartpole", "cartpole_short",
               {"env": "CartPole-v1", "return_range": [0, 1000], "episodes": 2}, {"task": "cartpole", "seed": 99}]
KWARGS = {"max_workers": 2, "episodes": 4}


@pytest.fixture
def two_servers(start_server):
    return start_server(log_level="WARNING"), start_server(log_level="WARNING")


def in_process_scores(tasks: list, kwargs: dict) -> list[float]:
    model = load_model("gpu_worker.models.cartpole:CartPolePolicy", None, device="cpu")
    parsed = [parse_task(i, t, kwargs, Limits()) for i, t in enumerate(tasks)]
    results = run_tasks(parsed, lambda name: LocalPolicy({"cartpole": model}, "cartpole", name), max_workers=2, failure_score=0.0)
    assert all(r.error is None for r in results)
    return [r.score for r in results]


def test_score_fans_out_over_both_servers_and_matches_in_process(two_servers, make_app):
    a, b = two_servers
    app = make_app(model_servers=(a.url, b.url))
    client = app.test_client()
    response = client.post("/score", json={"responses": EIGHT_TASKS, "reward_function_kwargs": KWARGS})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["failures"] == 0 and body["max_workers"] == 2
    assert body["scores"] == in_process_scores(EIGHT_TASKS, KWARGS)
    assert body["scores"][0] == 1.0 and body["scores"][3] == 1.0
    detail = body["details"][2]
    assert detail["episodes"] == 3 and detail["successes"] == 3 and detail["steps"] == 1500
    assert detail["mean_return"] == 500.0 and detail["error"] is None and detail["seconds"] > 0
    assert detail["task"]["seed"] == 7 and detail["servers"]
    assert body["details"][6]["successes"] is None and body["details"][6]["score"] == pytest.approx(0.5)
    status = client.get("/pool_status").get_json()
    assert all(s["requests"] > 0 for s in status["servers"]), status  # both servers took work
    # Same request, same seeds: same scores.
    again = client.post("/score", json={"responses": EIGHT_TASKS, "reward_function_kwargs": KWARGS}).get_json()
    assert again["scores"] == body["scores"]


def test_failed_task_gets_the_failure_score_and_its_error(two_servers, make_app):
    a, _ = two_servers
    app = make_app(model_servers=(a.url,), failure_score=-1.0)
    body = app.test_client().post("/score", json={"responses": ["cartpole_short", "gym:Acrobot-v1"],
                                                  "reward_function_kwargs": {"episodes": 2}}).get_json()
    assert body["scores"][0] == 1.0 and body["scores"][1] == -1.0
    assert body["failures"] == 1
    assert "has shape (6,); expected float32 array of shape (4,)" in body["details"][1]["error"]


BAD_BODIES = [
    ("not json", "this is not json", "body: must be a JSON object"),
    ("json list", [1, 2], "body: must be a JSON object, got list"),
    ("no responses", {}, "responses: must be a list, got NoneType"),
    ("responses not a list", {"responses": "cartpole"}, "responses: must be a list, got str"),
    ("empty", {"responses": []}, "responses: must hold at least one response"),
    ("too many", {"responses": ["cartpole"] * 11}, "responses: holds 11 responses; at most 10"),
    ("unknown task", {"responses": ["chess"]}, "responses[0]: unknown task 'chess'"),
    ("unknown env", {"responses": ["gym:NoSuchEnv-v9"]}, "unknown gymnasium env 'NoSuchEnv-v9'"),
    ("env that imports code", {"responses": ["gym:os:system"]}, "names a module to import"),
    ("response of wrong type", {"responses": [3]}, "responses[0]: must be a task name or an object, got int"),
    ("unknown response field", {"responses": [{"task": "cartpole", "epsiodes": 3}]}, "unknown field(s) ['epsiodes']"),
    ("episodes wrong type", {"responses": [{"task": "cartpole", "episodes": "3"}]}, "responses[0].episodes: must be an integer"),
    ("too many episodes", {"responses": [{"task": "cartpole", "episodes": 10**6}]}, "between 1 and 1000"),
    ("too many steps", {"responses": [{"task": "cartpole", "max_steps": 10**9}]}, "responses[0].max_steps: must be an integer between 1 and 100000"),
    ("negative seed", {"responses": [{"task": "cartpole", "seed": -1}]}, "responses[0].seed"),
    ("bad return range", {"responses": [{"env": "CartPole-v1", "return_range": [5, 1]}]}, "low must be below high"),
    ("no threshold", {"responses": ["gym:Pendulum-v1"]}, "give success_threshold or return_range"),
    ("kwargs not an object", {"responses": ["cartpole"], "reward_function_kwargs": [1]}, "reward_function_kwargs: must be an object"),
    ("unknown kwarg", {"responses": ["cartpole"], "reward_function_kwargs": {"workers": 2}}, "unknown field(s) ['workers']"),
    ("max_workers zero", {"responses": ["cartpole"], "reward_function_kwargs": {"max_workers": 0}}, "max_workers: must be an integer between 1 and 32"),
    ("max_workers huge", {"responses": ["cartpole"], "reward_function_kwargs": {"max_workers": 10**9}}, "max_workers"),
    ("unknown body field", {"responses": ["cartpole"], "kwargs": {}}, "unknown field(s) ['kwargs']"),
]


@pytest.mark.parametrize("name, body, message", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_bodies_get_400_naming_the_problem(two_servers, make_app, name, body, message):
    a, _ = two_servers
    app = make_app(model_servers=(a.url,), max_responses=10)
    client = app.test_client()
    if isinstance(body, str):
        response = client.post("/score", data=body, content_type="application/json")
    else:
        response = client.post("/score", json=body)
    assert response.status_code == 400
    assert message in response.get_json()["error"], response.get_json()
    ok = client.post("/score", json={"responses": ["cartpole_short"], "reward_function_kwargs": {"episodes": 1}})
    assert ok.status_code == 200 and ok.get_json()["scores"] == [1.0]  # still serving


def test_token_guards_score_and_pool_status_but_not_health(two_servers, make_app):
    a, _ = two_servers
    token = "s3cret-token-value"
    client = make_app(model_servers=(a.url,), token=token).test_client()
    body = {"responses": ["cartpole_short"], "reward_function_kwargs": {"episodes": 1}}
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": token}):
        response = client.post("/score", json=body, headers=headers)
        assert response.status_code == 401 and "unauthorized" in response.get_json()["error"]
        assert client.get("/pool_status", headers=headers).status_code == 401
    auth = {"Authorization": f"Bearer {token}"}
    assert client.post("/score", json=body, headers=auth).status_code == 200
    assert client.get("/pool_status", headers=auth).status_code == 200
    health = client.get("/health")
    assert health.status_code == 200 and health.get_json() == {"status": "ok", "model_servers_up": 1}


def test_health_is_503_and_score_refuses_when_no_model_server_is_up(make_app):
    client = make_app(model_servers=("ws://127.0.0.1:9",), connect_timeout_s=0.2).test_client()
    assert client.get("/health").status_code == 503
    response = client.post("/score", json={"responses": ["cartpole"]})
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert client.get("/pool_status").get_json()["servers"][0]["state"] == "down"


def test_oversize_body_gets_413_json(two_servers, make_app):
    a, _ = two_servers
    client = make_app(model_servers=(a.url,), max_body_bytes=2048).test_client()
    response = client.post("/score", data=json.dumps({"responses": ["cartpole"] * 1000}), content_type="application/json")
    assert response.status_code == 413 and "Too Large" in response.get_json()["error"]
    assert client.get("/nope").status_code == 404 and "error" in client.get("/nope").get_json()


def _post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_gunicorn_serves_score_over_two_model_servers(two_servers, tmp_path):
    a, b = two_servers
    log = open(tmp_path / "gunicorn.log", "wb")
    env = {**os.environ, "MODEL_SERVERS": f"{a.url},{b.url}", "GUNICORN_BIND": "127.0.0.1:0",
           "GUNICORN_WORKERS": "2", "GUNICORN_THREADS": "4", "REWARD_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "pi0_reward_server/gunicorn_config.py", "pi0_reward_server.app:create_app()"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline, port = time.monotonic() + 60, None
        while port is None and time.monotonic() < deadline:
            match = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", (tmp_path / "gunicorn.log").read_text())
            port = int(match.group(1)) if match else None
            time.sleep(0.1)
        assert port, (tmp_path / "gunicorn.log").read_text()
        base = f"http://127.0.0.1:{port}"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        status, body = _post(f"{base}/score", {"responses": EIGHT_TASKS, "reward_function_kwargs": KWARGS})
        assert status == 200, body
        assert body["scores"] == in_process_scores(EIGHT_TASKS, KWARGS)
        servers_used = {url for d in body["details"] for url in d["servers"]}
        assert servers_used == {a.url, b.url}  # both servers took work
        status, body = _post(f"{base}/score", {"responses": "cartpole"})
        assert status == 400 and "responses: must be a list" in body["error"]
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
        log.close()
