"""The client pool against gpu_worker and against a serial openpi-style server."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from conftest import affine
from gpu_worker.client import ServerError
from pi0_reward_server.client_pool import InferenceFailed, PoolTimeout


def obs(x: float) -> dict:
    return {"observation/state": np.array([x, x + 1], dtype=np.float32)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_concurrent_borrowers_never_share_a_connection(start_server, pools):
    a, b = start_server(models=(affine(),)), start_server(models=(affine(),))
    pool = pools([a.url, b.url], connections_per_server=2, max_connections_per_server=4)
    assert pool.wait_for_servers(2, 10)
    in_use: set[int] = set()
    lock = threading.Lock()
    clashes: list[int] = []
    failures: list[BaseException] = []
    n_threads = 12
    barrier = threading.Barrier(n_threads)

    def borrower(k: int) -> None:
        try:
            borrow(k)
        except BaseException as exc:  # noqa: BLE001 - a thread's failure must fail the test
            failures.append(exc)

    def borrow(k: int) -> None:
        barrier.wait()
        for j in range(15):
            with pool.connection(timeout_s=30) as (url, conn):
                with lock:
                    if id(conn) in in_use:
                        clashes.append(id(conn))
                    in_use.add(id(conn))
                reply = conn.infer(obs(k * 100 + j))
                np.testing.assert_allclose(reply["actions"], [2 * (k * 100 + j) + 1, 2 * (k * 100 + j + 1) + 1])
                with lock:
                    in_use.discard(id(conn))

    threads = [threading.Thread(target=borrower, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not failures, failures[:3]
    assert not clashes
    status = pool.status()
    assert all(s["idle_connections"] <= 4 for s in status["servers"])  # never more than the cap
    assert status["totals"]["in_flight"] == 0


def test_infer_routes_to_the_least_loaded_server_and_reports_status(start_server, pools):
    a, b = start_server(models=(affine(),)), start_server(models=(affine(),))
    pool = pools([a.url, b.url])
    assert pool.wait_for_servers(2, 10)
    for i in range(10):
        reply, url = pool.infer(obs(i))
        assert url in (a.url, b.url)
    status = pool.status()
    assert [s["requests"] for s in status["servers"]] == [5, 5]  # idle ties go to the one that served fewer
    server = status["servers"][0]
    assert set(server) >= {"url", "state", "in_flight", "idle_connections", "busy_connections", "requests", "errors",
                           "last_error", "latency_ms"}
    assert server["state"] == "up" and server["latency_ms"]["p50"] > 0
    assert status["totals"] == {"servers": 2, "up": 2, "in_flight": 0, "requests": 10, "errors": 0}


def test_a_down_server_is_skipped_and_rejoins_when_it_comes_up(start_server, pools):
    a = start_server(models=(affine(),))
    port = free_port()
    pool = pools([a.url, f"ws://127.0.0.1:{port}"])
    assert pool.wait_for_servers(1, 10)
    for i in range(6):
        _, url = pool.infer(obs(i))
        assert url == a.url
    down = pool.status()["servers"][1]
    assert down["state"] == "down" and "healthz" in down["last_error"]
    start_server(models=(affine(),), port=port)
    assert pool.wait_for_servers(2, 15), pool.status()
    urls = [pool.infer(obs(i))[1] for i in range(6)]
    assert f"ws://127.0.0.1:{port}" in urls  # the rejoined server takes work again


def test_a_server_that_goes_away_is_retried_elsewhere(start_server, pools):
    a, b = start_server(models=(affine(),)), start_server(models=(affine(),))
    pool = pools([a.url, b.url], health_interval_s=60)  # only the failed request can notice
    assert pool.wait_for_servers(2, 10)
    for i in range(4):
        pool.infer(obs(i))
    a.stop(grace_s=1)
    for i in range(10):  # every request still gets exactly one answer
        reply, url = pool.infer(obs(i))
        assert url == b.url
        np.testing.assert_allclose(reply["actions"], [2 * i + 1, 2 * i + 3])
    assert pool.status()["servers"][0]["state"] == "down"


def test_a_hung_server_times_out_its_connection_and_the_work_goes_elsewhere(start_server, openpi_servers, pools):
    hung = openpi_servers(hang=True)
    good = start_server(models=(affine(),))
    pool = pools([hung.url, good.url], request_timeout_s=0.5, retries=2, health_interval_s=60)
    assert pool.wait_for_servers(2, 10)
    for i in range(4):
        reply, url = pool.infer(obs(i))
        assert url == good.url
        np.testing.assert_allclose(reply["actions"], [2 * i + 1, 2 * i + 3])
    hung_status = pool.status()["servers"][0]
    assert hung_status["errors"] >= 1 and "no reply within 0.5s" in hung_status["last_error"]
    assert hung_status["busy_connections"] == 0


def test_pool_works_against_a_serial_openpi_style_server(openpi_servers, pools):
    server = openpi_servers()
    pool = pools([server.url], connections_per_server=1)
    assert pool.wait_for_servers(1, 10)
    reply, url = pool.infer(obs(3))
    np.testing.assert_allclose(reply["actions"], [7, 9])
    assert url == server.url
    with pytest.raises(ServerError, match="KeyError"):
        pool.infer({"wrong": 1})  # openpi sends a traceback, then closes the connection
    reply, _ = pool.infer(obs(4))  # the pool did not reuse the closed connection
    np.testing.assert_allclose(reply["actions"], [9, 11])
    assert server.requests == 3  # each frame reached the server once: nothing was resent


def test_acquire_times_out_with_a_clear_error(start_server, pools):
    a = start_server(models=(affine(),))
    pool = pools([a.url], connections_per_server=1, max_connections_per_server=1)
    assert pool.wait_for_servers(1, 10)
    with pool.connection():
        with pytest.raises(PoolTimeout, match=r"no model server connection became free within 0.2s"):
            with pool.connection(timeout_s=0.2):
                pass


def test_all_servers_failing_gives_inference_failed(openpi_servers, pools):
    hung = openpi_servers(hang=True)
    pool = pools([hung.url], request_timeout_s=0.2, retries=1, health_interval_s=60)
    assert pool.wait_for_servers(1, 10)
    with pytest.raises(InferenceFailed, match="after 2 attempt"):
        pool.infer(obs(1))
