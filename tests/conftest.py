"""Fixtures: real servers on free ports (port 0), real clients."""

from __future__ import annotations

import collections
import os
import pathlib
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from gpu_worker.config import ModelConfig, ServerConfig
from gpu_worker.models.testing import AffineModel
from gpu_worker.server import ServerThread

ROOT = pathlib.Path(__file__).resolve().parents[1]
AFFINE = "gpu_worker.models.testing:AffineModel"


def affine(name: str = "affine", **options) -> ModelConfig:
    return ModelConfig(name=name, target=AFFINE, options=options)


@pytest.fixture
def start_server():
    """start_server(**config) -> a running in-process ServerThread; stopped after the test."""
    started: list[ServerThread] = []

    def start(**kwargs) -> ServerThread:
        kwargs.setdefault("port", 0)
        handle = ServerThread(ServerConfig(**kwargs)).start()
        started.append(handle)
        return handle

    yield start
    AffineModel.gate.set()  # never leave a gated model blocking shutdown
    for handle in started:
        handle.stop(grace_s=2)
    AffineModel.gate.clear()
    AffineModel.entered.clear()


@pytest.fixture(autouse=True)
def _own_job_store(tmp_path, monkeypatch):
    """Each test's reward apps (in-process or gunicorn) keep jobs and cached results in a store of its own."""
    monkeypatch.setenv("REWARD_DATA_DIR", str(tmp_path / "data"))


@pytest.fixture(autouse=True)
def _reset_gate():
    AffineModel.gate.clear()
    AffineModel.entered.clear()
    yield


def cuda_count() -> int:
    """GPUs torch sees here (0 without torch's CUDA build): CUDA tests skip cleanly without one."""
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def http_status(url: str, timeout: float = 5.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


class CliServer:
    """``python -m gpu_worker`` in a subprocess; the port is read from its log."""

    def __init__(self, args: list[str], log_path: pathlib.Path, env: dict | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpu_worker", "--port", "0", *args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env,
        )
        try:
            self.port = self._wait_for_port()
        except BaseException:
            self.stop()  # never leave a server behind when it fails to come up
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_for_port(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"listening on ws://[^:]+:(\d+)", self.log())
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise TimeoutError(f"server did not start listening:\n{self.log()}")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if http_status(f"http://127.0.0.1:{self.port}/healthz") == 200:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise TimeoutError(f"server never became healthy:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def close_app(app) -> None:
    """Everything a reward app holds: its job runner, client pool and LIBERO worker processes."""
    app.extensions["job_runner"].close()
    app.extensions["stop_membership"].set()
    app.extensions["client_pool"].close()
    for runner in app.extensions["libero_runners"]:
        runner.close()


@pytest.fixture
def make_app():
    """make_app(**config) -> a reward app built through the factory; closed after the test."""
    from pi0_reward_server.app import create_app

    made: list = []

    def make(**overrides):
        overrides.setdefault("log_level", "WARNING")
        app = create_app(overrides)
        made.append(app)
        return app

    yield make
    for app in made:
        close_app(app)


class ServedApp:
    """A reward app served over real HTTP by werkzeug's threaded server, counting requests by route."""

    def __init__(self, app) -> None:
        from werkzeug.serving import make_server

        self.app = app
        self.counts: collections.Counter = collections.Counter()  # "POST /jobs" -> how many arrived
        inner = app.wsgi_app

        def counting(environ, start_response):
            path = environ.get("PATH_INFO", "")
            route = "/jobs/<id>" if path.startswith("/jobs/") else path
            self.counts[f"{environ.get('REQUEST_METHOD')} {route}"] += 1
            return inner(environ, start_response)

        app.wsgi_app = counting
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="served-app", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve_app(make_app):
    """serve_app(**config) -> a :class:`ServedApp` (built by make_app) on a free port; stopped after."""
    served: list[ServedApp] = []

    def serve(**overrides) -> ServedApp:
        handle = ServedApp(make_app(**overrides))
        served.append(handle)
        return handle

    yield serve
    for handle in served:
        handle.stop()


@pytest.fixture
def pools():
    """pools(urls, wait=False, **options) -> a started ClientPool with fast health checks; closed after."""
    from pi0_reward_server.client_pool import ClientPool

    made: list = []

    def make(urls, *, wait: bool = False, **options):
        options.setdefault("backoff_initial_s", 0.05)
        options.setdefault("backoff_max_s", 0.2)
        options.setdefault("health_interval_s", 0.2)
        pool = ClientPool(urls, **options).start()
        made.append(pool)
        if wait:
            assert pool.wait_for_servers(len(urls), 10)
        return pool

    yield make
    for pool in made:
        pool.close()


@pytest.fixture
def openpi_servers():
    """openpi_servers(**options) -> a running serial openpi-style server (tests/openpi_style_server.py)."""
    from openpi_style_server import OpenpiStyleServer

    made: list = []

    def make(**options):
        server = OpenpiStyleServer(**options).start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def cli_server(tmp_path):
    servers: list[CliServer] = []

    def start(*args: str, env: dict | None = None) -> CliServer:
        server = CliServer(list(args), tmp_path / f"server{len(servers)}.log", env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
