"""The model server's serving path at the WebSocket frame level: what a client that does not wait for each
reply before sending the next (pipelining), splits a message into fragments, or sends before it has read
the metadata frame gets. Requests are answered from the protocol callback (gpu_worker/server.py); these
tests pin down that replies still come one per request, in request order."""

from __future__ import annotations

import numpy as np
from websockets.sync.client import connect

from conftest import affine
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
