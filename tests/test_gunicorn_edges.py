"""The production app (gunicorn with the shipped config) at its edges: secrets in logs,
chunked bodies over the size limit, admission, and new work during a graceful stop."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, affine
from gpu_worker.models.testing import AffineModel

TOKEN = "s3cret-Token-that-must-never-be-logged-7d1f"


class Gunicorn:
    """``gunicorn -c pi0_reward_server/gunicorn_config.py 'pi0_reward_server.app:create_app()'`` on a free port."""

    def __init__(self, tmp_path, env: dict) -> None:
        logs = tmp_path / f"gunicorn-{time.monotonic_ns()}"  # its own logs: an earlier instance's port is not its
        logs.mkdir()
        self.log_path = logs / "gunicorn.out"
        self.access_log = logs / "access.log"
        self.error_log = logs / "error.log"
        full = {**os.environ, "GUNICORN_BIND": "127.0.0.1:0", "GUNICORN_ACCESSLOG": str(self.access_log),
                "GUNICORN_ERRORLOG": str(self.error_log), "REWARD_LOG_LEVEL": "INFO", **env}
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "pi0_reward_server/gunicorn_config.py",
                                          "pi0_reward_server.app:create_app()"], cwd=ROOT, env=full, stdout=out,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        self.port = None
        while self.port is None:
            assert time.monotonic() < deadline and self.proc.poll() is None, self.logs()
            match = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", self.logs())
            self.port = int(match.group(1)) if match else None
            time.sleep(0.1)
        # Every worker has its own pool, up on its own time: wait until each one has answered /health with
        # 200 (answers name their worker), or a first request may reach a worker whose pool is not up yet.
        workers, ready = int(env.get("GUNICORN_WORKERS", "1")), set()
        while len(ready) < workers:
            assert time.monotonic() < deadline, self.logs()
            status, headers, _ = self.request("GET", "/health")
            if status == 200:
                ready.add(headers.get("X-Reward-Worker"))
            else:
                time.sleep(0.1)

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in (self.log_path, self.access_log, self.error_log)
                       if p.exists())

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 60) -> tuple[int | None, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        except (ConnectionError, OSError):
            return None, {}, b""
        finally:
            conn.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture
def gunicorn(tmp_path):
    started: list[Gunicorn] = []

    def start(**env) -> Gunicorn:
        g = Gunicorn(tmp_path, env)
        started.append(g)
        return g

    yield start
    for g in started:
        g.stop()


SCORE = json.dumps({"responses": [{"task": "cartpole", "max_steps": 5, "success_threshold": 5}],
                    "reward_function_kwargs": {"episodes": 1}}).encode()


@pytest.mark.slow
def test_the_token_never_reaches_any_log_however_it_is_sent(start_server, gunicorn):
    server = start_server(log_level="WARNING")
    app = gunicorn(MODEL_SERVERS=server.url, REWARD_SERVER_TOKEN=TOKEN)
    basic_user = base64.b64encode(f"{TOKEN}:x".encode()).decode()
    basic_password = base64.b64encode(f"user:{TOKEN}".encode()).decode()
    json_type = {"Content-Type": "application/json"}
    attempts = [
        ("POST", "/score", {"Authorization": f"Bearer {TOKEN}", **json_type}, 200),
        ("POST", "/score", {"Authorization": f"Bearer {TOKEN}x", **json_type}, 401),
        ("POST", "/score", {"Authorization": f"Basic {basic_user}", **json_type}, 401),
        ("POST", "/score", {"Authorization": f"Basic {basic_password}", **json_type}, 401),
        ("POST", f"/score?access_token={TOKEN}", json_type, 401),
        ("POST", f"/score?token={TOKEN}&x=1", json_type, 401),
        ("GET", f"/pool_status?access_token={TOKEN}", {}, 401),
        ("GET", f"/health?token={TOKEN}", {}, 200),
        ("POST", "/score", {"Cookie": f"token={TOKEN}", "X-Api-Key": TOKEN, **json_type}, 401),
        ("GET", "/pool_status", {"Authorization": f"Bearer {TOKEN}", "Referer": f"http://x/?token={TOKEN}"}, 200),
    ]
    for method, path, headers, expected in attempts:
        status, _, _ = app.request(method, path, SCORE if method == "POST" else None, headers)
        assert status == expected, (method, path, headers, status)
    assert app.stop() == 0
    logs = app.logs()
    assert logs.count('"POST /score HTTP/1.1" 200') == 1 and logs.count('"POST /score HTTP/1.1" 401') == 6, logs
    assert TOKEN not in logs
    assert TOKEN[:12] not in logs and basic_user not in logs and basic_password not in logs


def chunked_post(port: int, body: bytes, chunk: int = 4096) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.putrequest("POST", "/score")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for start in range(0, len(body), chunk):
            piece = body[start:start + chunk]
            conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        conn.send(b"0\r\n\r\n")
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


@pytest.mark.slow
def test_a_chunked_body_over_the_limit_gets_413_however_it_is_framed(start_server, gunicorn):
    server = start_server(log_level="WARNING")
    limit = 4096
    app = gunicorn(MODEL_SERVERS=server.url, REWARD_MAX_BODY_BYTES=str(limit))
    valid_then_padding = SCORE + b" " * (limit + 100)  # once cut at the limit, this was valid JSON and got scored
    padding_first = b" " * (limit + 100) + SCORE  # ... and this got a misleading 400
    for body in (valid_then_padding, padding_first, b"x" * (3 * limit)):
        status, payload = chunked_post(app.port, body)
        assert status == 413 and "max_body_bytes" in payload["error"], (status, payload)
    status, payload = chunked_post(app.port, SCORE + b" " * (limit - len(SCORE)))  # exactly at the limit
    assert status == 200 and payload["scores"] == [1.0], payload
    status, payload = chunked_post(app.port, SCORE, chunk=7)
    assert status == 200 and payload["scores"] == [1.0], payload
    status, _, body = app.request("POST", "/score", valid_then_padding, {"Content-Type": "application/json"})
    assert status == 413  # Content-Length framing, as before


@pytest.mark.slow
def test_new_work_during_a_graceful_stop_gets_a_fast_503_while_in_flight_work_finishes(start_server, gunicorn):
    server = start_server(models=(affine(gated=True),), log_level="WARNING")
    app = gunicorn(MODEL_SERVERS=server.url, GUNICORN_GRACEFUL_TIMEOUT="120")
    in_flight: dict = {}
    body = json.dumps({"responses": [{"task": "cartpole", "model": "affine", "max_steps": 3, "success_threshold": 3}],
                       "reward_function_kwargs": {"episodes": 1}}).encode()

    def hold() -> None:
        in_flight["result"] = app.request("POST", "/score", body, {"Content-Type": "application/json"}, timeout=120)

    holder = threading.Thread(target=hold)
    holder.start()
    assert AffineModel.entered.wait(30)  # the request is inside the model, held by the gate
    app.proc.send_signal(signal.SIGTERM)
    # /health, not /score: a request accepted before the worker saw the signal is served, and a /score would
    # block on the gated model like the one in flight.
    deadline = time.monotonic() + 30
    while (health := app.request("GET", "/health", timeout=10))[0] == 200:
        assert time.monotonic() < deadline, app.logs()
        time.sleep(0.05)
    assert health[0] == 503 and health[1].get("Retry-After") == "5", health
    refused = app.request("POST", "/score", SCORE, {"Content-Type": "application/json"}, timeout=10)
    assert refused[0] == 503 and refused[1].get("Retry-After") == "5", refused
    assert "shutting down" in json.loads(refused[2])["error"]
    assert holder.is_alive()  # refused while the in-flight request was still being served
    AffineModel.gate.set()
    holder.join(60)
    status, _, payload = in_flight["result"]
    assert status == 200 and json.loads(payload)["failures"] == 0
    assert app.proc.wait(60) == 0


def test_a_request_larger_than_the_admission_bound_is_refused_even_when_idle(start_server):
    from pi0_reward_server.app import create_app

    server = start_server(log_level="WARNING")
    app = create_app({"model_servers": (server.url,), "max_inflight_tasks": 3, "log_level": "WARNING"})
    try:
        client = app.test_client()
        response = client.post("/score", json={"responses": ["cartpole_short"] * 4})
        assert response.status_code == 400
        assert "at most 3 can be in flight in one app worker (max_inflight_tasks)" in response.get_json()["error"]
        ok = client.post("/score", json={"responses": ["cartpole_short"] * 3,
                                         "reward_function_kwargs": {"episodes": 1}})
        assert ok.status_code == 200
    finally:
        app.extensions["client_pool"].close()
