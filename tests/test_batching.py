"""Dynamic batching through a real server: batches form, answers stay right and in order."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from conftest import affine
from gpu_worker.batching import DynamicBatcher, Request
from gpu_worker.client import ModelClient, ServerError
from gpu_worker.config import ModelConfig
from gpu_worker.model import load_model
from gpu_worker.models.testing import AffineModel


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.002)


def state(*values: float) -> dict:
    return {"observation/state": np.array(values, dtype=np.float32)}


class Background:
    """Run one call per client in threads; collect results or errors."""

    def __init__(self) -> None:
        self.results: dict = {}
        self.threads: list[threading.Thread] = []

    def run(self, key, fn, *args) -> None:
        def target():
            try:
                self.results[key] = fn(*args)
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                self.results[key] = exc

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self) -> dict:
        for thread in self.threads:
            thread.join(30)
        return self.results


def hold_model(handle, name: str = "affine") -> tuple[Background, ModelClient]:
    """Send one request that blocks inside the gated model; return once it is running."""
    client = ModelClient(handle.url)
    background = Background()
    background.run("holder", client.infer, state(100.0))
    assert AffineModel.entered.wait(10)
    return background, client


def test_concurrent_clients_share_one_forward_pass(start_server):
    handle = start_server(models=(affine(gated=True),), max_wait_ms=0)
    model = handle.server.models["affine"].policy
    batcher = handle.server.models["affine"].batcher
    background, _ = hold_model(handle)
    n = 8
    clients = [ModelClient(handle.url) for _ in range(n)]
    for i, client in enumerate(clients):
        background.run(i, client.infer, state(i, i + 0.5))
    wait_for(lambda: batcher.queued_rows == n)
    AffineModel.gate.set()
    results = background.join()

    assert model.calls == [1, n]
    assert results["holder"]["server_timing"]["batch_size"] == 1
    for i in range(n):
        reply = results[i]
        np.testing.assert_allclose(reply["actions"], [2 * i + 1, 2 * (i + 0.5) + 1])
        assert reply["row_sum"] == pytest.approx(2 * i + 0.5)
        timing = reply["server_timing"]
        assert timing["batch_size"] == n and timing["batch_requests"] == n
        assert timing["queue_ms"] >= 0 and timing["infer_ms"] >= 0
        assert reply["model"] == {"name": "affine", "version": "affine-1"}


def test_incompatible_shapes_get_their_own_batch_and_explicit_batches_join(start_server):
    handle = start_server(models=(affine(gated=True),), max_wait_ms=0)
    model = handle.server.models["affine"].policy
    batcher = handle.server.models["affine"].batcher
    background, _ = hold_model(handle)
    sends = [
        ("a", state(1, 2)),
        ("b", state(1, 2, 3)),
        ("c", state(3, 4)),
        ("d", [state(5, 6), state(7, 8), state(9, 10)]),
        ("e", state(4, 5, 6)),
    ]
    queued = 0
    for key, payload in sends:  # one at a time, so the queue order is known
        client = ModelClient(handle.url)
        if isinstance(payload, list):
            background.run(key, client.infer_batch, payload)
            queued += len(payload)
        else:
            background.run(key, client.infer, payload)
            queued += 1
        wait_for(lambda: batcher.queued_rows == queued)
    AffineModel.gate.set()
    results = background.join()

    assert model.calls == [1, 5, 2]  # a, c and d's three rows together; then b and e
    np.testing.assert_allclose(results["a"]["actions"], [3, 5])
    np.testing.assert_allclose(results["b"]["actions"], [3, 5, 7])
    np.testing.assert_allclose(results["e"]["actions"], [9, 11, 13])
    assert [list(r["actions"]) for r in results["d"]] == [[11, 13], [15, 17], [19, 21]]
    assert all(r["server_timing"]["batch_size"] == 5 for r in results["d"])
    assert results["b"]["server_timing"]["batch_size"] == 2


def test_results_equal_direct_calls_and_stay_in_order(start_server):
    handle = start_server(models=(ModelConfig.parse("cartpole=gpu_worker.models.cartpole:CartPolePolicy"),))
    direct = load_model("gpu_worker.models.cartpole:CartPolePolicy", None, device="cpu")
    rng = np.random.default_rng(0)
    n_clients, n_requests = 16, 25
    states = rng.normal(size=(n_clients, n_requests, 4)).astype(np.float32)
    barrier = threading.Barrier(n_clients)
    batch_sizes: list[int] = []

    def run_client(i: int) -> list[np.ndarray]:
        with ModelClient(handle.url) as client:
            barrier.wait()
            out = []
            for j in range(n_requests):
                reply = client.infer({"observation/state": states[i, j]})
                batch_sizes.append(reply["server_timing"]["batch_size"])
                out.append(reply["logits"])
            return out

    background = Background()
    for i in range(n_clients):
        background.run(i, run_client, i)
    results = background.join()

    for i in range(n_clients):
        expected = direct.infer_batch({"observation/state": states[i]})["logits"]
        np.testing.assert_allclose(np.stack(results[i]), expected, rtol=1e-5, atol=1e-5)
    assert len(batch_sizes) == n_clients * n_requests
    assert max(batch_sizes) > 1, "16 concurrent clients never shared a forward pass"


def test_model_exception_reaches_every_request_of_the_batch(start_server):
    handle = start_server(models=(affine(gated=True, fail_on_negative=True),), max_wait_ms=0)
    batcher = handle.server.models["affine"].batcher
    background, holder = hold_model(handle)
    clients = [ModelClient(handle.url) for _ in range(3)]
    for i, (client, value) in enumerate(zip(clients, [1.0, -1.0, 2.0])):
        background.run(i, client.infer, state(value))
        wait_for(lambda: batcher.queued_rows == i + 1)
    AffineModel.gate.set()
    results = background.join()

    assert results["holder"]["actions"][0] == 201
    for i in range(3):
        assert isinstance(results[i], ServerError)
        assert "model 'affine' failed: ValueError: negative input in batch" in str(results[i])
    # The same connections and the server keep working.
    assert clients[1].infer(state(3.0))["actions"][0] == 7
    assert holder.infer(state(4.0))["actions"][0] == 9


def test_explicit_batch_larger_than_max_batch_is_run_in_chunks(start_server):
    handle = start_server(models=(affine(),), max_batch_size=4)
    with ModelClient(handle.url) as client:
        replies = client.infer_batch([state(i) for i in range(10)])
    assert [float(r["actions"][0]) for r in replies] == [2 * i + 1 for i in range(10)]
    assert handle.server.models["affine"].policy.calls == [4, 4, 2]


def test_full_queue_answers_overloaded_and_recovers(start_server):
    handle = start_server(models=(affine(gated=True),), max_wait_ms=0, max_queue=3)
    batcher = handle.server.models["affine"].batcher
    background, _ = hold_model(handle)
    for i in range(3):
        background.run(i, ModelClient(handle.url).infer, state(i))
        wait_for(lambda: batcher.queued_rows == i + 1)
    extra = ModelClient(handle.url)
    with pytest.raises(ServerError) as excinfo:
        extra.infer(state(9))
    assert excinfo.value.overloaded
    assert "max_queue=3" in str(excinfo.value)
    AffineModel.gate.set()
    results = background.join()
    assert [float(results[i]["actions"][0]) for i in range(3)] == [1, 3, 5]
    assert extra.infer(state(9))["actions"][0] == 19


def test_prompts_batch_together_and_replies_follow_request_order(start_server):
    handle = start_server(models=(ModelConfig(name="p", target="gpu_worker.models.testing:PromptModel"),))
    with ModelClient(handle.url) as client:
        prompts = ["a", "pick up the bowl", "put it on the plate"]
        replies = client.infer_batch(
            [{"observation/state": np.array([i, i], np.float32), "prompt": p} for i, p in enumerate(prompts)]
        )
        assert [int(r["prompt_len"]) for r in replies] == [len(p) for p in prompts]
        assert [float(r["row_sum"]) for r in replies] == [0.0, 2.0, 4.0]
        assert all("prev_total_ms" not in r["server_timing"] for r in replies)  # first frame of the connection
        for j in range(5):  # lock-step: each reply answers the frame just sent
            reply = client.infer({"observation": {"state": [j, 1.0]}, "prompt": "x" * j})
            assert float(reply["row_sum"]) == j + 1 and int(reply["prompt_len"]) == j
            assert reply["server_timing"]["prev_total_ms"] > 0


def test_run_inline_runs_a_lone_request_on_the_callers_thread_and_never_beside_the_batcher():
    import threading

    inside = threading.Lock()
    overlaps: list[int] = []
    threads_seen: set[str] = set()

    def infer(batch):
        if not inside.acquire(blocking=False):
            overlaps.append(1)  # two forward passes at once: the model is not thread-safe
            inside.acquire()
        try:
            threads_seen.add(threading.current_thread().name)
            return {"y": batch["x"] * 2}
        finally:
            inside.release()

    batcher = DynamicBatcher(infer, name="inline", max_batch_size=8)
    batcher.start()
    try:
        x = {"x": np.ones((1, 2), np.float32)}
        assert batcher.run_inline(Request(dict(x), 1)) is None  # no forward timed yet: queue as usual
        batcher.submit(Request(dict(x), 1)).result(5)
        result, error = batcher.run_inline(Request(dict(x), 1))
        assert error is None and result.outputs["y"].tolist() == [[2.0, 2.0]] and result.timing.batch_size == 1
        assert threading.current_thread().name in threads_seen
        batcher.inline_max_s = 0.0  # a model too slow for it: never inline
        assert batcher.run_inline(Request(dict(x), 1)) is None
        batcher.inline_max_s = 1.0
        stop = threading.Event()

        def submitter():
            while not stop.is_set():
                batcher.submit(Request(dict(x), 1)).result(5)

        workers = [threading.Thread(target=submitter) for _ in range(3)]
        for w in workers:
            w.start()
        ran_inline = sum(batcher.run_inline(Request(dict(x), 1)) is not None for _ in range(2000))
        stop.set()
        for w in workers:
            w.join(10)
        assert overlaps == [] and 0 <= ran_inline <= 2000
    finally:
        batcher.stop(5)


def test_a_waiting_batch_stays_open_while_requests_come_and_starts_once_they_stop():
    """Requests closer together than the gap join one batch; as many requests as the last batch had start the
    next at once, however long the gap."""
    sizes: list[int] = []

    def infer(batch):
        sizes.append(len(batch["x"]))
        return {"y": batch["x"] * 2}

    x = {"x": np.ones((1, 2), np.float32)}
    batcher = DynamicBatcher(infer, name="gap", max_batch_size=8, max_wait_s=30.0, gap_s=0.4)
    batcher.start()
    try:
        futures = []
        for _ in range(3):  # fewer than the starting "last batch" (max_batch_size): the batch waits
            futures.append(batcher.submit(Request(dict(x), 1)))
            time.sleep(0.05)
        assert [f.result(10).outputs["y"].tolist() for f in futures] == [[[2.0, 2.0]]] * 3
        assert sizes == [3]
    finally:
        batcher.stop(5)

    batcher = DynamicBatcher(infer, name="gap", max_batch_size=8, max_wait_s=30.0, gap_s=2.0)
    batcher.start()
    try:
        started = time.monotonic()
        batcher.submit(Request(dict(x), 1)).result(10)  # the first: fewer than max_batch_size, waits the gap
        assert time.monotonic() - started >= 2.0
        started = time.monotonic()
        batcher.submit(Request(dict(x), 1)).result(10)  # as many as last time (1)
        assert time.monotonic() - started < 1.5
    finally:
        batcher.stop(5)


def _forward_in(seconds: float):
    def infer(batch):
        time.sleep(seconds)
        return {"y": batch["x"]}

    return infer


def test_a_batch_waits_no_longer_than_a_forward_pass():
    """Requests trickling in closer together than the gap, after a batch of 60 that took 0.3 s: without a
    bound the next batch would stay open until 60 are in (about 4 s) or the 30 s cap; it waits about one
    forward pass instead."""
    x = {"x": np.ones((1, 2), np.float32)}
    batcher = DynamicBatcher(_forward_in(0.3), name="slow", max_batch_size=64, max_wait_s=30.0, gap_s=0.2)
    batcher.start()
    stop = threading.Event()

    def trickle():
        while not stop.is_set():
            batcher.submit(Request(dict(x), 1))
            time.sleep(0.06)

    try:
        for f in [batcher.submit(Request(dict(x), 1)) for _ in range(60)]:
            f.result(10)
        feeder = threading.Thread(target=trickle, daemon=True)
        started = time.monotonic()
        first = batcher.submit(Request(dict(x), 1))
        feeder.start()
        first.result(20)
        assert time.monotonic() - started < 2.5  # about 0.3 s of waiting and 0.3 s of forward
    finally:
        stop.set()
        batcher.stop(10)


def test_a_model_faster_than_the_gap_does_not_wait():
    """A forward of 0.5 s and a gap of 1 s: a lone request after a batch of 2 (fewer than last time) runs at
    once rather than waiting the 0.5 s a slower model would."""
    x = {"x": np.ones((1, 2), np.float32)}
    batcher = DynamicBatcher(_forward_in(0.5), name="fast", max_batch_size=2, max_wait_s=30.0, gap_s=1.0)
    batcher.start()
    try:
        for f in [batcher.submit(Request(dict(x), 1)) for _ in range(2)]:  # a full batch: no wait
            f.result(10)
        started = time.monotonic()
        batcher.submit(Request(dict(x), 1)).result(20)
        assert time.monotonic() - started < 0.9  # the forward alone
    finally:
        batcher.stop(5)


def test_batch_gap_must_be_a_non_negative_time():
    with pytest.raises(ValueError, match="gap_s must be >= 0"):
        DynamicBatcher(lambda batch: batch, gap_s=-1)
