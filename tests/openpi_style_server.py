"""A minimal serial openpi-style policy server for tests, mirroring openpi's
``WebsocketPolicyServer``: inference on the event loop, one request at a time,
``GET /healthz``, and on an error the traceback as a text frame followed by
closing the connection (1011). Its policy returns ``actions = 2 * state + 1``.

``hang=True`` makes it accept connections, send the metadata frame and never
answer (a hung server).
"""

from __future__ import annotations

import asyncio
import threading
import traceback

import numpy as np
import websockets
from websockets.asyncio.server import serve

from gpu_worker import wire


class OpenpiStyleServer:
    def __init__(self, *, hang: bool = False, port: int = 0) -> None:
        self.hang = hang
        self.requested_port = port
        self.port: int | None = None
        self.requests = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def _handler(self, ws) -> None:
        await ws.send(wire.packb({"policy": "openpi-style"}))
        while True:
            try:
                frame = await ws.recv()
            except websockets.ConnectionClosed:
                return
            if self.hang:
                continue  # never answer
            try:
                obs = wire.unpackb(frame)
                self.requests += 1
                state = np.asarray(obs["observation/state"], dtype=np.float32)
                await ws.send(wire.packb({"actions": 2 * state + 1, "server_timing": {"infer_ms": 0.0}}))
            except Exception:  # noqa: BLE001 - as openpi does: traceback, then close
                await ws.send(traceback.format_exc())
                await ws.close(1011, "Internal server error. Traceback included in previous frame.")
                return

    @staticmethod
    def _health(connection, request):
        if request.path == "/healthz":
            return connection.respond(200, "OK\n")
        return None

    def start(self) -> "OpenpiStyleServer":
        self._thread.start()

        async def start():
            self._server = await serve(self._handler, "127.0.0.1", self.requested_port, compression=None,
                                       max_size=None, process_request=self._health)
            return self._server.sockets[0].getsockname()[1]

        self.port = asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        async def stop():
            self._server.close()
            await self._server.wait_closed()

        if self._server is not None:
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
