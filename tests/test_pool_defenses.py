"""Defenses found by review: the pool's health thread, leaks, request-caused errors, request bounds."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from conftest import affine
from pi0_reward_server.app import create_app
from pi0_reward_server.client_pool import ClientPool, RequestRejected


@pytest.fixture
def garbage_port():
    """A port that answers anything with a line that is not HTTP."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def serve():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.0\r\n")
                time.sleep(0.05)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(2)
    listener.close()


def test_health_thread_survives_a_port_that_does_not_speak_http(start_server, garbage_port):
    good = start_server(models=(affine(),))
    with ClientPool([f"ws://127.0.0.1:{garbage_port}", good.url], backoff_initial_s=0.05).start() as pool:
        assert pool.wait_for_servers(1, 10), pool.status()
        reply, url = pool.infer({"observation/state": np.array([1.0], np.float32)})
        assert url == good.url and reply["actions"][0] == 3
        assert pool.status()["servers"][0]["state"] == "down"


def test_an_unsendable_value_does_not_leak_the_connection(start_server):
    server = start_server(models=(affine(),))
    with ClientPool([server.url], connections_per_server=1, max_connections_per_server=1,
                    acquire_timeout_s=2).start(wait_s=10) as pool:
        for _ in range(3):
            with pytest.raises(TypeError):
                pool.infer({"observation/state": np.array([1 + 2j])})  # complex: refused by the packer
        assert pool.status()["servers"][0]["busy_connections"] == 0
        reply, _ = pool.infer({"observation/state": np.array([2.0], np.float32)})
        assert reply["actions"][0] == 5


def test_a_broken_connection_is_not_returned_to_the_pool(start_server):
    server = start_server(models=(affine(delay_s=0.5),))
    with ClientPool([server.url], connections_per_server=1, request_timeout_s=0.1).start(wait_s=10) as pool:
        with pool.connection() as (_, conn):
            try:
                conn.infer({"observation/state": np.array([1.0], np.float32)})
            except TimeoutError:
                pass  # the borrower swallows it; the connection is broken all the same
            broken = conn
        with pool.connection() as (_, conn):
            assert conn is not broken and not conn.broken


def test_an_oversized_request_does_not_mark_servers_down(start_server):
    servers = [start_server(models=(affine(),), max_message_bytes=4096) for _ in range(2)]
    with ClientPool([s.url for s in servers], health_interval_s=60).start() as pool:
        assert pool.wait_for_servers(2, 10)
        with pytest.raises(RequestRejected, match="too big|1009"):
            pool.infer({"observation/state": np.zeros(10_000, np.float32)})
        assert [s["state"] for s in pool.status()["servers"]] == ["up", "up"]


@pytest.mark.parametrize("body, message", [
    ({"responses": [{"task": [1]}]}, "must be a string"),
    ({"responses": [{"kind": "selfplay", "game": {}}]}, "unknown game"),
])
def test_unhashable_fields_get_400(start_server, body, message):
    server = start_server(models=(affine(),))
    app = create_app({"model_servers": (server.url,), "log_level": "WARNING"})
    response = app.test_client().post("/score", json=body)
    assert response.status_code == 400 and message in response.get_json()["error"]
    app.extensions["client_pool"].close()


def test_deeply_nested_json_gets_400_and_work_caps_apply(start_server):
    server = start_server(log_level="WARNING")
    app = create_app({"model_servers": (server.url,), "log_level": "WARNING", "max_env_steps_per_request": 10_000,
                      "max_simulations_per_request": 100_000})
    client = app.test_client()
    deep = client.post("/score", data="[" * 100_000 + "]" * 100_000, content_type="application/json")
    assert deep.status_code == 400 and "nests too deeply" in deep.get_json()["error"]
    big = client.post("/score", json={"responses": [{"task": "cartpole", "episodes": 30}]})  # 30 x 500 steps
    assert big.status_code == 400 and "15000 environment steps; at most 10000" in big.get_json()["error"]
    sims = client.post("/score", json={"responses": [{"kind": "selfplay", "game": "connect4", "games": 8,
                                                      "simulations": 400}]})
    assert sims.status_code == 400 and "MCTS simulations; at most 100000" in sims.get_json()["error"]
    app.extensions["client_pool"].close()


def test_a_request_past_its_time_limit_fails_its_tasks_instead_of_running_on(start_server):
    server = start_server(models=(affine(delay_s=0.2),))
    app = create_app({"model_servers": (server.url,), "log_level": "WARNING", "max_request_seconds": 0.5})
    spec = {"env": "CartPole-v1", "model": "affine", "episodes": 1, "return_range": [0, 500]}
    started = time.monotonic()
    body = app.test_client().post("/score", json={"responses": [spec]}).get_json()
    assert time.monotonic() - started < 5
    assert body["failures"] == 1 and "max_request_seconds" in body["details"][0]["error"]
    app.extensions["client_pool"].close()
