"""A serial openpi-style policy server for tests, behaving as openpi's
``WebsocketPolicyServer`` does: the first frame is the policy's metadata; then
each binary frame is unpacked and handed straight to ``policy.infer(obs)``,
which needs one observation *map* (a list fails on ``.items()``, as it does in
openpi); inference runs on the event loop, one request at a time; ``GET
/healthz`` answers 200; on any error the traceback goes back as a text frame and
the connection is closed (1011).

Without a model its policy returns ``actions = 2 * state + 1``. With
``model="module:Class[@CKPT]"`` it hosts a gpu_worker model the way openpi
hosts a checkpoint: one observation, a batch of one, the row sent back.
``hang=True`` makes it accept connections, send the metadata frame and never
answer (a hung server; set ``hang = False`` to let it recover). ``barrier``: a ``threading.Barrier`` each inference
waits on first (with its event loop blocked, as openpi's is), so a test can
prove that two servers were asked at the same time. ``delay_s``: each inference
takes this long, with the event loop blocked (a slow serial server).

As a program (what ``start_pi0_models.sh``'s ``MODEL_SERVER_CMD`` runs in tests)::

    python tests/openpi_style_server.py --port 8000 [--model module:Class[@CKPT]]
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import signal
import sys
import threading
import time
import traceback
from typing import Any

import numpy as np
import websockets
from websockets.asyncio.server import serve

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from gpu_worker import wire  # noqa: E402


class AffinePolicy:
    def metadata(self) -> dict[str, Any]:
        return {"policy": "openpi-style"}

    def infer(self, obs: dict) -> dict[str, Any]:
        obs = {k: v for k, v in obs.items()}  # a list frame fails here, exactly as in openpi
        state = np.asarray(obs["observation/state"], dtype=np.float32)
        return {"actions": 2 * state + 1}


class HostedPolicy:
    """A gpu_worker model behind openpi's ``Policy.infer(obs: dict) -> dict`` interface."""

    def __init__(self, target: str, device: str = "cpu") -> None:
        from gpu_worker.config import ModelConfig
        from gpu_worker.model import load_model

        config = ModelConfig.parse(f"policy={target}")
        self.policy = load_model(config.target, config.checkpoint, device=device, options=config.options)

    def metadata(self) -> dict[str, Any]:
        return self.policy.metadata()

    def infer(self, obs: dict) -> dict[str, Any]:
        from gpu_worker.protocol import coerce_observation

        inputs = {k: v for k, v in obs.items()}  # a list frame fails here, exactly as in openpi
        batch = {k: v[None] for k, v in coerce_observation(inputs, self.policy.input_spec, "policy").items()}
        return {key: value[0] for key, value in self.policy.infer_batch(batch).items()}


class OpenpiStyleServer:
    def __init__(self, *, hang: bool = False, port: int = 0, model: str | None = None, host: str = "127.0.0.1",
                 barrier: threading.Barrier | None = None, delay_s: float = 0.0) -> None:
        self.hang = hang
        self.delay_s = delay_s
        self.barrier = barrier
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self.frames = 0  # frames received, answered or not
        self.requests = 0  # frames handed to the policy
        self.frames_refused = 0  # frames that were not one observation map
        self.model_keys_seen = 0  # maps carrying gpu_worker's __model__ key
        self.policy = HostedPolicy(model) if model else AffinePolicy()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def _handler(self, ws) -> None:
        await ws.send(wire.packb(self.policy.metadata()))
        prev_total_ms = None
        while True:
            try:
                frame = await ws.recv()
            except websockets.ConnectionClosed:
                return
            self.frames += 1
            if self.hang:
                continue  # never answer
            try:
                started = self._loop.time()
                obs = wire.unpackb(frame)
                if not isinstance(obs, dict):
                    self.frames_refused += 1
                elif "__model__" in obs:
                    self.model_keys_seen += 1  # openpi would hand it to the policy as an input
                self.requests += 1
                if self.barrier is not None:
                    self.barrier.wait(timeout=10)
                if self.delay_s:
                    time.sleep(self.delay_s)  # blocks the event loop, as openpi's inference does
                action = self.policy.infer(obs)  # on the event loop, like openpi
                timing = {"infer_ms": (self._loop.time() - started) * 1000}
                if prev_total_ms is not None:
                    timing["prev_total_ms"] = prev_total_ms
                action["server_timing"] = timing
                await ws.send(wire.packb(action))
                prev_total_ms = (self._loop.time() - started) * 1000
            except Exception:  # noqa: BLE001 - as openpi does: traceback, then close
                await ws.send(traceback.format_exc())
                await ws.close(1011, "Internal server error. Traceback included in previous frame.")
                return

    @staticmethod
    def _health(connection, request):
        if request.path == "/healthz":
            return connection.respond(200, "OK\n")
        return None

    async def _serve(self):
        self._server = await serve(self._handler, self.host, self.requested_port, compression=None,
                                   max_size=None, process_request=self._health)
        return self._server.sockets[0].getsockname()[1]

    def start(self) -> "OpenpiStyleServer":
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(30)
        return self

    def stop(self) -> None:
        async def stop():
            self._server.close()
            await self._server.wait_closed()

        if self._server is not None:
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description="a serial openpi-style policy server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default=None, help="module:Class[@CHECKPOINT] (default: 2 * state + 1)")
    args = parser.parse_args()
    server = OpenpiStyleServer(port=args.port, model=args.model, host=args.host).start()
    print(f"openpi-style server listening on ws://{args.host}:{server.port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop()


if __name__ == "__main__":
    main()
