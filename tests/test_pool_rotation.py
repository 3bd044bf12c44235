"""Servers leave rotation when they fail and rejoin promptly when they serve again.

* A server that lets a request time out (it accepts connections, sends its
  metadata and answers /healthz, but never replies) leaves rotation at once and
  rejoins only after answering a real inference: a task pays at most one
  timeout per hung server, and later requests pay none.
* A server that was away for a long time rejoins within about one probe
  interval of answering again: backoff applies to reconnects that fail, not to
  the cheap /healthz probe.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from openpi_style_server import OpenpiStyleServer
from pi0_reward_server.app import create_app
from pi0_reward_server.client_pool import DOWN, UP, ClientPool

SIXTEEN_SHORT_TASKS = {"responses": [{"task": "cartpole", "max_steps": 10, "success_threshold": 10, "seed": i}
                                     for i in range(16)],
                       "reward_function_kwargs": {"episodes": 1, "max_workers": 4}}


@pytest.fixture
def hung():
    server = OpenpiStyleServer(hang=True).start()
    yield server
    server.stop()


def test_a_hung_server_leaves_rotation_after_one_timeout_and_stays_out(start_server, hung):
    good = start_server(log_level="WARNING")
    # A long backoff: after its first failed probe inference the hung server gets no other probe during this
    # test, so any frame it receives after that is work.
    app = create_app({"model_servers": (good.url, hung.url), "request_timeout_s": 1.0, "backoff_initial_s": 60,
                      "log_level": "ERROR"})
    pool = app.extensions["client_pool"]
    try:
        assert pool.wait_for_servers(2, 10)
        client = app.test_client()
        first = client.post("/score", json=SIXTEEN_SHORT_TASKS)
        assert first.status_code == 200 and first.get_json()["scores"] == [1.0] * 16, first.get_json()
        def hung_status() -> dict:
            return next(s for s in pool.status()["servers"] if s["url"] == hung.url)

        deadline = time.monotonic() + 10
        while not hung_status()["reconnect_in_s"]:  # its probe inference timed out too: backing off now
            assert time.monotonic() < deadline, hung_status()
            time.sleep(0.05)
        # At most one frame per scoring thread was in flight there when the first timeout struck, plus the probe.
        assert 2 <= hung.frames <= 5
        assert hung_status()["state"] == DOWN and hung_status()["needs_inference"]
        frames_after_first = hung.frames
        second = client.post("/score", json=SIXTEEN_SHORT_TASKS)
        assert second.status_code == 200 and second.get_json()["scores"] == [1.0] * 16
        assert hung.frames == frames_after_first  # the second request paid no timeout
        assert all(d["servers"] == [good.url] for d in second.get_json()["details"])
    finally:
        pool.close()


def test_a_hung_server_rejoins_only_after_answering_a_real_inference(hung):
    good = OpenpiStyleServer().start()
    pool = ClientPool([good.url, hung.url], request_timeout_s=0.5, backoff_initial_s=0.2, backoff_max_s=0.4,
                      probe_interval_s=0.1, health_interval_s=0.2).start()
    try:
        assert pool.wait_for_servers(2, 10)
        obs = {"observation/state": np.array([1.0, 2.0], np.float32)}
        for _ in range(4):
            reply, _ = pool.infer(obs, prefer=hung.url)
            np.testing.assert_allclose(reply["actions"], [3, 5])
        before = hung.frames
        assert not pool.wait_for_servers(2, 1.5)  # /healthz answers 200 all along, yet it stays out
        assert hung.frames > before  # ... because the probe inferences it was sent got no answer
        hung.hang = False
        assert pool.wait_for_servers(2, 5)  # the next probe inference is answered: back in rotation
        status = next(s for s in pool.status()["servers"] if s["url"] == hung.url)
        assert status["state"] == UP and not status["needs_inference"]
    finally:
        pool.close()
        good.stop()


def test_a_server_back_after_a_long_outage_rejoins_within_a_probe_interval(tmp_path):
    server = OpenpiStyleServer().start()
    port = server.port
    # Reconnect backoff starts at 60 s: were it applied to the cheap probe too, rejoining would take a minute.
    pool = ClientPool([server.url], backoff_initial_s=60, backoff_max_s=60, probe_interval_s=0.2,
                      health_interval_s=0.2, connect_timeout_s=1, acquire_timeout_s=2).start()
    try:
        assert pool.wait_for_servers(1, 10)
        server.stop()
        with pytest.raises(Exception):
            pool.infer({"observation/state": np.array([1.0], np.float32)})
        assert pool.status()["servers"][0]["state"] == DOWN
        time.sleep(1.0)  # several probes fail while it is away
        server = OpenpiStyleServer(port=port).start()
        assert pool.wait_for_servers(1, 5)
        reply, _ = pool.infer({"observation/state": np.array([1.0], np.float32)})
        np.testing.assert_allclose(reply["actions"], [3])
    finally:
        pool.close()
        server.stop()


def test_a_slow_serial_server_that_keeps_answering_stays_in_rotation():
    """Requests queued behind others at a serial server can time out; it answered meanwhile, so it is slow,
    not hung, and it keeps its place (evicting it would pile its load onto the rest)."""
    slow = OpenpiStyleServer(delay_s=0.3).start()
    pool = ClientPool([slow.url], request_timeout_s=0.5, retries=3, connections_per_server=4,
                      backoff_initial_s=60, probe_interval_s=0.1).start()
    try:
        assert pool.wait_for_servers(1, 10)
        results, errors = [], []

        def call(x: float) -> None:
            try:
                results.append(pool.infer({"observation/state": np.array([x], np.float32)})[0])
            except Exception as exc:  # noqa: BLE001 - collected and checked below
                errors.append(exc)

        import threading
        threads = [threading.Thread(target=call, args=(float(i),)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        status = pool.status()["servers"][0]
        assert status["errors"] >= 1 and "slow, not hung" in status["last_error"]  # some requests did time out
        assert status["state"] == UP and not status["needs_inference"]
        assert len(results) + len(errors) == 4
    finally:
        pool.close()
        slow.stop()
