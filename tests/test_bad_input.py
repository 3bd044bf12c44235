"""Every bad frame gets an error that names the problem; the server and other connections carry on."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import websockets
from websockets.sync.client import connect

from conftest import affine
from gpu_worker import wire
from gpu_worker.client import ModelClient
from gpu_worker.config import ModelConfig

CARTPOLE = ModelConfig.parse("cartpole=gpu_worker.models.cartpole:CartPolePolicy")
GOOD = {"observation/state": np.zeros(4, dtype=np.float32)}


def obj_array_frame() -> bytes:
    return msgpack.packb(
        {"observation/state": {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O", b"shape": [1]}},
        use_bin_type=True,
    )


BAD_FRAMES = [
    ("random bytes", bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8)), "bad request: frame"),
    ("text frame", "{'observation/state': [0, 0, 0, 0]}", "text frames are not accepted"),
    ("scalar frame", wire.packb(42), "a frame must be an observation map or a list of them, got int"),
    ("missing key", wire.packb({"state": np.zeros(4)}), "missing key(s) ['observation/state'] for model 'cartpole'"),
    ("string for array", wire.packb({"observation/state": "left"}), "observation['observation/state'] must be float32 array of shape (4,), got str"),
    ("wrong shape", wire.packb({"observation/state": np.zeros(3)}), "has shape (3,); expected float32 array of shape (4,)"),
    ("nested wrong shape", wire.packb({"observation": {"state": np.zeros((2, 4))}}), "has shape (2, 4)"),
    ("mixed list", wire.packb({"observation/state": [True, "x", 1, 2]}), "got values of dtype <U"),
    ("object dtype", obj_array_frame(), "array dtype '|O' is not allowed"),
    ("ragged list", wire.packb({"observation/state": [[1, 2], [3]]}), "observation['observation/state']"),
    ("null value", wire.packb({"observation/state": None}), "got NoneType"),
    ("non-string key", msgpack.packb({1: 2}), "observation keys must be strings"),
    ("unknown model", wire.packb({**GOOD, "__model__": "nope"}), "unknown model 'nope'; this server hosts ['affine', 'cartpole']"),
    ("model name not a string", wire.packb({**GOOD, "__model__": 3}), "'__model__' must be a string"),
    ("empty batch", wire.packb([]), "an explicit batch must hold at least one observation"),
    ("batch of non-maps", wire.packb([1, 2]), "batch item 0: an observation must be a map"),
    ("batch mixing models", wire.packb([GOOD, {**GOOD, "__model__": "affine"}]), "an explicit batch must use one model"),
    ("bad batch item", wire.packb([GOOD, {"observation/state": np.zeros(5)}]), "batch item 1: observation['observation/state'] has shape (5,)"),
    ("array data too short", msgpack.packb({"observation/state": {b"__ndarray__": True, b"data": b"\0" * 4, b"dtype": "<f4", b"shape": [4]}}, use_bin_type=True), "holds 4 bytes, not what shape [4] of dtype <f4 needs"),
]


@pytest.fixture
def server(start_server):
    return start_server(models=(CARTPOLE, affine()), max_message_bytes=1 << 20)


@pytest.mark.parametrize("name, frame, message", BAD_FRAMES, ids=[b[0] for b in BAD_FRAMES])
def test_bad_frame_gets_a_named_error_and_the_connection_survives(server, name, frame, message):
    with ModelClient(server.url) as client, ModelClient(server.url) as other:
        reply = client.send_raw(frame)
        assert isinstance(reply, str), f"{name}: expected an error text frame, got {reply!r}"
        assert message in reply
        assert client.infer(GOOD)["actions"] in (0, 1)  # same connection still works
        assert other.infer(GOOD)["actions"] in (0, 1)


def test_oversize_frame_closes_only_that_connection_with_1009(server):
    with ModelClient(server.url) as client, ModelClient(server.url) as other:
        huge = wire.packb({"observation/state": np.zeros(300_000, dtype=np.float32)})  # 1.2 MB > 1 MiB
        with pytest.raises(websockets.ConnectionClosed) as excinfo:
            client.send_raw(huge)
        assert excinfo.value.rcvd is not None and excinfo.value.rcvd.code == 1009
        assert other.infer(GOOD)["actions"] in (0, 1)
    with ModelClient(server.url) as fresh:
        assert fresh.infer(GOOD)["actions"] in (0, 1)


def test_unknown_model_in_path_is_refused_with_404(server):
    with pytest.raises(websockets.InvalidStatus) as excinfo:
        connect(server.url + "/models/nope", open_timeout=5)
    assert excinfo.value.response.status_code == 404
    assert b"unknown model" in excinfo.value.response.body


def test_openpi_client_style_frame_without_batch_dim_works(server):
    with ModelClient(server.url + "/models/affine") as client:
        assert client.metadata["model"] == "affine"
        reply = client.infer({"observation/state": np.array([1.0, 2.0])})  # float64 is cast to float32
        np.testing.assert_allclose(reply["actions"], [3.0, 5.0])
