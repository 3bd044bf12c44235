"""Every path to the model servers against a server that behaves exactly like openpi's.

openpi's ``WebsocketPolicyServer`` hands each decoded frame to ``policy.infer``,
which needs one observation map: a list frame (gpu_worker's explicit batch) gets
a traceback and a closed connection. The pool must read each server's
capabilities from its metadata frame, send such a server one map per frame
(spread over connections and servers at once), and never send it gpu_worker's
``__model__`` key. Every task kind scored through the app must give the same
results as through gpu_worker for the same seeds.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import affine
from gpu_worker.config import ModelConfig
from pi0_reward_server.app import create_app

CARTPOLE = "gpu_worker.models.cartpole:CartPolePolicy"
CONNECT4 = "gpu_worker.models.selfplay_net:Connect4Net"
DOTS = "gpu_worker.models.selfplay_net:DotsBoxes3x3Net"


def obs(x: float) -> dict:
    return {"observation/state": np.array([x, x + 1], dtype=np.float32)}


def test_a_batch_reaches_an_openpi_server_as_one_map_per_frame(openpi_servers, pools):
    server = openpi_servers()
    pool = pools([server.url], wait=True)
    replies, url = pool.infer_batch([obs(i) for i in range(5)], model="anything")
    assert url == server.url
    for i, reply in enumerate(replies):
        np.testing.assert_allclose(reply["actions"], [2 * i + 1, 2 * i + 3])
    assert server.requests == 5 and server.frames_refused == 0
    assert server.model_keys_seen == 0  # __model__ is gpu_worker's; openpi would feed it to the policy
    status = pool.status()["servers"][0]
    assert status["server"] == "openpi-compatible" and status["explicit_batch"] is False


def test_a_split_batch_asks_several_openpi_servers_at_once(openpi_servers, pools):
    # Each server's inference blocks its event loop at a barrier that only opens when both are inferring:
    # a pool that sent the maps one after another would break the barrier and fail the step.
    barrier = threading.Barrier(2)
    a, b = openpi_servers(barrier=barrier), openpi_servers(barrier=barrier)
    pool = pools([a.url, b.url], wait=True, connections_per_server=1)
    replies, _ = pool.infer_batch([obs(1), obs(2)])
    np.testing.assert_allclose([r["actions"] for r in replies], [[3, 5], [5, 7]])
    assert (a.requests, b.requests) == (1, 1)


def test_a_failing_map_fails_the_step_and_the_pool_recovers(openpi_servers, pools):
    server = openpi_servers()
    pool = pools([server.url], wait=True)
    with pytest.raises(Exception, match="KeyError"):
        pool.infer_batch([obs(1), {"wrong": 1}, obs(3)])
    replies, _ = pool.infer_batch([obs(4), obs(5)])  # closed connections were not reused
    np.testing.assert_allclose(replies[1]["actions"], [11, 13])


def test_mixed_pool_gives_gpu_worker_batches_and_openpi_maps(start_server, openpi_servers, pools):
    gpu = start_server(models=(affine(),), log_level="WARNING")
    openpi = openpi_servers()
    pool = pools([gpu.url, openpi.url], wait=True, connections_per_server=1)
    assert {s["server"]: s["explicit_batch"] for s in pool.status()["servers"]} == {
        "gpu_worker": True, "openpi-compatible": False}
    calls = gpu.server.models["affine"].policy.calls
    results: list = []
    errors: list = []
    barrier = threading.Barrier(4)

    def step(k: int) -> None:
        try:
            barrier.wait(10)
            for j in range(10):
                batch = [obs(100 * k + 10 * j + i) for i in range(4)]
                replies, _ = pool.infer_batch(batch, model="affine")
                results.append((batch, replies))
        except BaseException as exc:  # noqa: BLE001 - a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=step, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == 40
    for batch, replies in results:
        for o, reply in zip(batch, replies):
            np.testing.assert_allclose(reply["actions"], 2 * o["observation/state"] + 1)
    assert openpi.requests > 0 and openpi.frames_refused == 0 and openpi.model_keys_seen == 0
    assert max(calls) > 1  # gpu_worker got explicit batches, not one map at a time


def score(app, body: dict) -> dict:
    response = app.test_client().post("/score", json=body)
    assert response.status_code == 200, response.get_json()
    payload = response.get_json()
    for detail in payload["details"]:
        assert detail["error"] is None, detail["error"]
    return payload


def comparable(payload: dict) -> list[dict]:
    """What must agree between servers: everything but where and how fast it ran, and the model versions
    (gpu_worker names them in its replies; openpi's server names none)."""
    return [{k: v for k, v in d.items()
             if k not in ("servers", "seconds", "network_calls", "mean_batch_rows", "model_versions")}
            for d in payload["details"]]


@pytest.mark.slow
@pytest.mark.parametrize("kind, target, name, body", [
    ("gym rollout", CARTPOLE, "cartpole", {
        "responses": ["cartpole_short", {"task": "cartpole", "episodes": 3, "seed": 7, "max_steps": 120},
                      {"task": "gym:CartPole-v1", "return_range": [0, 200], "max_steps": 200, "episodes": 2}],
        "reward_function_kwargs": {"max_workers": 2, "episodes": 4}}),
    ("selfplay match", CONNECT4, "connect4", {
        "responses": [{"kind": "selfplay", "game": "connect4", "opponent": "mcts", "games": 4, "simulations": 16,
                       "leaves_per_round": 4, "seed": 3}],
        "reward_function_kwargs": {"max_workers": 1}}),
    ("selfplay generate", DOTS, "dots_boxes_3x3", {
        "responses": [{"kind": "selfplay", "game": "dots_boxes", "mode": "generate", "games": 3, "simulations": 16,
                       "leaves_per_round": 8, "seed": 5}],
        "reward_function_kwargs": {"max_workers": 1}}),
])
def test_every_task_kind_scores_the_same_against_openpi_servers_as_against_gpu_worker(
        start_server, openpi_servers, kind, target, name, body):
    gpu = start_server(models=(ModelConfig(name=name, target=target),), log_level="WARNING")
    openpi = [openpi_servers(model=target), openpi_servers(model=target)]
    via_gpu = create_app({"model_servers": (gpu.url,), "log_level": "WARNING"})
    via_openpi = create_app({"model_servers": tuple(s.url for s in openpi), "log_level": "WARNING"})
    try:
        expected = score(via_gpu, body)
        got = score(via_openpi, body)
    finally:
        via_gpu.extensions["client_pool"].close()
        via_openpi.extensions["client_pool"].close()
    assert got["scores"] == expected["scores"]
    assert comparable(got) == comparable(expected)
    assert all(d["model_versions"] for d in expected["details"]) and not any("model_versions" in d
                                                                           for d in got["details"])
    assert sum(s.requests for s in openpi) > 0
    assert all(s.frames_refused == 0 and s.model_keys_seen == 0 for s in openpi)
    assert len({url for d in got["details"] for url in d["servers"]}) >= 1
