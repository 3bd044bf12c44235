"""Frames built to hurt: they get a named error quickly, bounded memory, and nobody else is affected."""

from __future__ import annotations

import functools
import threading
import time

import msgpack
import numpy as np
import pytest
import websockets
from websockets.sync.client import connect

from conftest import affine
from gpu_worker import wire
from gpu_worker.client import ModelClient, ServerError
from gpu_worker.config import ModelConfig
from gpu_worker.models.testing import AffineModel

PROMPT = ModelConfig(name="p", target="gpu_worker.models.testing:PromptModel")


def raw_array(dtype: str, shape: list, data: bytes) -> dict:
    return {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}


@pytest.fixture
def server(start_server):
    return start_server(models=(PROMPT, affine()))


def good(client: ModelClient) -> None:
    reply = client.infer({"observation/state": np.array([1.0, 2.0], np.float32), "prompt": "ok"})
    assert float(reply["row_sum"]) == 3.0


HOSTILE = [
    ("rank 64000 shape", msgpack.packb({"observation/state": raw_array("<f4", [2] * 64000, b"")}, use_bin_type=True),
     "at most 32 non-negative integers"),
    ("huge dimensions", msgpack.packb({"observation/state": raw_array("<f4", [2**62] * 30, b"\0" * 8)}, use_bin_type=True),
     "not what shape"),
    ("deep nesting", wire.packb(functools.reduce(lambda acc, _: {"k": acc}, range(500), {"x": 1})),
     "nest deeper than 8 levels"),
    ("long key", wire.packb({"k" * 10_000: 1, "observation/state": [1, 2], "prompt": "x"}), "longer than 256 characters"),
    ("huge prompt", wire.packb({"observation/state": [1.0, 2.0], "prompt": "x" * 100_000}), "at most 4096"),
    ("lone surrogate", msgpack.packb({"observation/state": [1.0, 2.0],
                                      "prompt": raw_array("<U1", [], b"\x00\xd8\x00\x00")}, use_bin_type=True),
     "not valid Unicode"),
    ("invalid code point", msgpack.packb({"observation/state": [1.0, 2.0],
                                          "prompt": raw_array("<U1", [], b"\xff\xff\xff\xff")}, use_bin_type=True),
     "invalid Unicode code points"),
    ("ragged explicit batch", wire.packb([{"__model__": "affine", "observation/state": np.zeros(2, np.float32)},
                                          {"__model__": "affine", "observation/state": np.zeros(3, np.float32)}]),
     "must have equal shapes"),
    ("flat then nested duplicate", wire.packb({"observation/state": [1.0, 2.0], "observation": {"state": [3.0, 4.0]},
                                               "prompt": "x"}), "given twice"),
    ("nested then flat duplicate", wire.packb({"observation": {"state": [3.0, 4.0]}, "observation/state": [1.0, 2.0],
                                               "prompt": "x"}), "given twice"),
]


@pytest.mark.parametrize("name, frame, message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_frame_is_refused_quickly_and_others_carry_on(server, name, frame, message):
    with ModelClient(server.url) as client, ModelClient(server.url) as other:
        started = time.monotonic()
        reply = client.send_raw(frame)
        assert time.monotonic() - started < 5
        assert isinstance(reply, str) and reply.startswith("bad request:"), reply
        assert message in reply
        good(client)
        good(other)


def test_client_that_timed_out_never_returns_a_late_reply(start_server):
    handle = start_server(models=(affine(delay_s=0.5),))
    client = ModelClient(handle.url, timeout=0.2)
    with pytest.raises(TimeoutError):
        client.infer({"observation/state": np.array([1.0], np.float32)})
    with pytest.raises(ConnectionError, match="closed after an earlier failure"):
        client.infer({"observation/state": np.array([10.0], np.float32)})


def test_drain_past_the_grace_period_fails_queued_requests_and_returns(start_server):
    handle = start_server(models=(affine(gated=True),), max_wait_ms=0)
    batcher = handle.server.models["affine"].batcher
    results: dict = {}

    def call(i: int) -> None:
        try:
            results[i] = ModelClient(handle.url).infer({"observation/state": np.array([i], np.float32)})
        except (ServerError, websockets.ConnectionClosed) as exc:
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    threads[0].start()
    assert AffineModel.entered.wait(10)
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 10
    while batcher.queued_rows < 3:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    started = time.monotonic()
    handle.stop(grace_s=0.5)  # the model never finishes: the gate stays shut
    assert time.monotonic() - started < 15
    for t in threads:
        t.join(10)
    assert len(results) == 4
    for i in range(4):
        assert isinstance(results[i], (ServerError, websockets.ConnectionClosed))
    assert any("shutting down" in str(r) for r in results.values())
    AffineModel.gate.set()


def test_connection_cap_answers_503(start_server):
    handle = start_server(models=(affine(),), max_connections=2)
    with ModelClient(handle.url), ModelClient(handle.url):
        with pytest.raises(websockets.InvalidStatus) as excinfo:
            connect(handle.url, open_timeout=5)
        assert excinfo.value.response.status_code == 503
    with ModelClient(handle.url) as client:  # a slot is free again
        assert client.infer({"observation/state": np.array([1.0], np.float32)})["actions"][0] == 3


def test_model_whose_outputs_clash_with_reply_fields_is_refused(start_server):
    with pytest.raises(Exception, match=r"outputs \['server_timing'\], which replies reserve"):
        start_server(models=(ModelConfig(name="r", target="gpu_worker.models.testing:ReservedOutputModel"),))
