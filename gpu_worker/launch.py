"""Start a model server in a fresh process from Python, safely.

A process that has already imported torch (or touched CUDA) must not fork a
child that uses them: the child inherits locked OpenMP/CUDA state and can
hang. :func:`start_server_process` always uses the ``spawn`` start method, so
the child begins with a clean interpreter and loads its models itself. The
chosen port comes back over a direct pipe (no ``multiprocessing.Manager``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import logging
import os
from typing import Mapping

from gpu_worker.config import ServerConfig, ws_url


def _child(config: ServerConfig, env: Mapping[str, str], conn) -> None:
    os.environ.update(env)  # before torch is imported, so CUDA_VISIBLE_DEVICES takes effect
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    from gpu_worker.server import serve_until_signalled

    code = asyncio.run(
        serve_until_signalled(
            config,
            on_ready=lambda port: conn.send(("ready", port)),
            on_error=lambda message: conn.send(("error", message)),
        )
    )
    raise SystemExit(code)


@dataclasses.dataclass
class ServerProcess:
    process: multiprocessing.Process
    port: int
    host: str

    @property
    def url(self) -> str:
        return ws_url(self.host, self.port)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait for the drain, SIGKILL if it does not end in time."""
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        return self.process.exitcode


def start_server_process(
    config: ServerConfig, *, env: Mapping[str, str] | None = None, timeout: float = 120.0
) -> ServerProcess:
    """Spawn a server process and wait until its models are loaded.

    ``env`` is applied in the child before anything imports torch, for example
    ``{"CUDA_VISIBLE_DEVICES": "1"}`` to pin it to one GPU.
    """
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(config, dict(env or {}), child_conn), name="gpu_worker", daemon=False)
    process.start()
    child_conn.close()
    if not parent_conn.poll(timeout):
        process.kill()
        raise TimeoutError(f"model server did not become ready within {timeout}s")
    try:
        status, value = parent_conn.recv()
    except EOFError:
        process.join(5)
        raise RuntimeError(f"model server process exited with code {process.exitcode} before it was ready") from None
    if status != "ready":
        process.join(10)
        raise RuntimeError(f"model server failed to start: {value}")
    return ServerProcess(process=process, port=value, host=config.host)
