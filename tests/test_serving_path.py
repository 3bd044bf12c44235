"""The model server's serving path at the WebSocket frame level: what a client that does not wait for each
reply before sending the next (pipelining), splits a message into fragments, or sends before it has read
the metadata frame gets. Requests are answered from the protocol callback (gpu_worker/server.py); these
tests pin down that replies still come one per request, in request order."""

from __future__ import annotations

import numpy as np
import pytest
from websockets.sync.client import connect

from conftest import affine, cuda_count
from gpu_worker import wire


def state(x: float) -> bytes:
    return wire.packb({"observation/state": np.full(4, x, np.float32)})


def answer(frame: bytes | str) -> float | str:
    if isinstance(frame, str):
        return frame
    return float(wire.unpackb(frame)["actions"][0])


def test_pipelined_requests_are_answered_in_order_with_errors_in_place(start_server):
    server = start_server(models=(affine(), affine("slow", delay_s=0.05)))
    with connect(server.url, max_size=None) as ws:
        ws.recv()  # metadata
        # The slow model's request is queued on its batcher while the next ones run at once: their answers
        # must still wait for it, and an error reply keeps its place.
        slow = wire.packb({"observation/state": np.full(4, 1.0, np.float32), "__model__": "slow"})
        for frame in (slow, state(2.0), b"\xc1", state(3.0), "a text frame"):
            ws.send(frame)
        replies = [answer(ws.recv(timeout=10)) for _ in range(5)]
    assert replies[0] == 3.0 and replies[1] == 5.0 and replies[3] == 7.0
    assert replies[2].startswith("bad request") and replies[4].startswith("text frames are not accepted")


def test_more_requests_than_the_pipelining_limit_all_get_answers(start_server):
    server = start_server(models=(affine(delay_s=0.002),))
    with connect(server.url, max_size=None) as ws:
        ws.recv()
        for i in range(50):  # past MAX_PIPELINED: the server stops reading, answers, reads again
            ws.send(state(float(i)))
        replies = [answer(ws.recv(timeout=10)) for _ in range(50)]
    assert replies == [2.0 * i + 1 for i in range(50)]


def test_a_fragmented_message_is_one_request(start_server):
    server = start_server(models=(affine(),))
    frame = state(4.0)
    with connect(server.url, max_size=None) as ws:
        ws.recv()
        ws.send([frame[:5], frame[5:11], frame[11:]])  # an iterable of bytes goes out as fragments
        assert answer(ws.recv(timeout=10)) == 9.0
        ws.send(state(1.0))
        assert answer(ws.recv(timeout=10)) == 3.0


def test_a_request_sent_before_the_metadata_is_read_is_answered_after_it(start_server):
    server = start_server(models=(affine(),))
    with connect(server.url, max_size=None) as ws:
        ws.send(state(5.0))
        ws.send(state(6.0))
        metadata = wire.unpackb(ws.recv(timeout=10))
        assert metadata["server"]["name"] == "gpu_worker"  # the metadata frame comes first
        assert [answer(ws.recv(timeout=10)) for _ in range(2)] == [11.0, 13.0]


def test_a_large_pipelined_frame_decoded_off_the_loop_keeps_its_place(start_server):
    # codec_offload_bytes=1: every frame is decoded on the codec pool; order must hold all the same.
    server = start_server(models=(affine(),), codec_offload_bytes=1)
    with connect(server.url, max_size=None) as ws:
        ws.recv()
        for i in range(20):
            ws.send(state(float(i)))
        assert [answer(ws.recv(timeout=10)) for _ in range(20)] == [2.0 * i + 1 for i in range(20)]



@pytest.mark.cuda
@pytest.mark.skipif(cuda_count() == 0, reason="needs a CUDA GPU")
def test_cuda_server_answers_as_the_cpu_forward_does_for_lone_batched_and_pinned_inputs(start_server, monkeypatch):
    """The CUDA path: a lone request (inline), concurrent ones (batched) and an explicit batch large enough
    to go through pinned host memory (over 64 KiB, with pinning turned on) all get the CPU model's answers."""
    import threading

    from gpu_worker.client import ModelClient
    from gpu_worker.config import ModelConfig
    from gpu_worker.model import TorchPolicy, load_model

    monkeypatch.setattr(TorchPolicy, "pin_host_bytes", 64 * 1024)
    options = {"width": 256, "depth": 2}
    model = ModelConfig(name="compute", target="gpu_worker.models.compute_mlp:ComputeMLP", options=options)
    server = start_server(models=(model,), device="cuda", max_batch_size=512)  # one 300-row forward
    reference = load_model(model.target, None, device="cpu", options=options)
    rng = np.random.default_rng(0)
    states = rng.normal(size=(300, 64)).astype(np.float32)  # 300 x 64 x 4 bytes = 75 KiB: pinned
    expected = reference.infer_batch({"observation/state": states})["actions"]
    with ModelClient(server.url) as client:
        assert client.metadata["server"]["device"] == "cuda"
        lone = client.infer({"observation/state": states[0]})["actions"]
        batch = client.infer_batch([{"observation/state": s} for s in states])
    np.testing.assert_allclose(lone, expected[0], atol=1e-4)
    np.testing.assert_allclose(np.stack([r["actions"] for r in batch]), expected, atol=1e-4)
    answers: dict[int, np.ndarray] = {}

    def call(i: int) -> None:
        with ModelClient(server.url) as client:
            for j in range(i, 300, 8):
                answers[j] = client.infer({"observation/state": states[j]})["actions"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    np.testing.assert_allclose(np.stack([answers[j] for j in range(300)]), expected, atol=1e-4)
