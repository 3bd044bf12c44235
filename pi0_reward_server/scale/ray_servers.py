"""Model servers as Ray actors: one gpu_worker per GPU anywhere in a Ray cluster.

Each actor reserves its GPU (``num_gpus=1``; Ray sets ``CUDA_VISIBLE_DEVICES`` for it) or, where there is
no GPU, ``num_cpus``, and runs the normal server process, ``python -m gpu_worker``, bound to its node's
address: the wire protocol, ``/healthz``, ``/status`` and ``/metrics`` are those of any model server. The
child process dies with its actor (``PR_SET_PDEATHSIG``), so a killed actor leaves no server behind.

:func:`launch_servers` starts them (spread over the nodes) and returns a :class:`ServerGroup`, which tells
a registrar as servers join and leave: :class:`AppRegistrar` (the app's token-guarded
``/admin/pool/servers`` route, which every app process follows) or :class:`PoolRegistrar` (a client pool
in this process). :meth:`ServerGroup.watch` notices actors that died and deregisters them.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Protocol, Sequence

import ray

logger = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


def _find_prctl():
    """libc's prctl, looked up here in the parent: between fork and exec in a threaded process (a Ray
    worker) the child may only call what is already resolved; a dlopen there can deadlock on a lock some
    other thread held at the fork."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the actor's stop() and Ray's own cleanup remain
        return None


_prctl = _find_prctl()


def _die_with_parent(parent: int) -> None:
    """In the child before exec: SIGTERM it when the actor's process dies (even by SIGKILL), so the server
    drains and exits instead of serving on as an orphan nobody tracks. A parent that died before the
    prctl took effect sends nothing: then the child ends here."""
    if _prctl is None:
        return
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)


def _ws_url(host: str, port: int) -> str:
    """``ws://host:port``, an IPv6 address in brackets."""
    return f"ws://[{host}]:{port}" if ":" in host else f"ws://{host}:{port}"


class _PortTaken(Exception):
    """Another process bound the chosen port first: choose again."""


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class ModelServer:
    """The body of the Ray actor (``ray.remote`` wraps it in :func:`launch_servers`): one gpu_worker process."""

    def __init__(self, server_args: Sequence[str], *, bind_host: str | None = None, env: dict[str, str] | None = None,
                 ready_timeout_s: float = 300.0, attempts: int = 3) -> None:
        self.node_ip = ray.util.get_node_ip_address()
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        host = bind_host or self.node_ip
        for attempt in range(attempts):
            # A free port chosen here, not --port 0: the port then does not depend on the server's log level.
            port = _free_port(host)
            self.url = _ws_url(self.node_ip if host in ("0.0.0.0", "::") else host, port)
            command = [sys.executable, "-m", "gpu_worker", *server_args, "--host", host, "--port", str(port)]
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                            preexec_fn=functools.partial(_die_with_parent, os.getpid()))
            threading.Thread(target=self._drain, args=(self.process,), name="server-log", daemon=True).start()
            try:
                self._wait_healthy(ready_timeout_s)
                return
            except _PortTaken:
                if attempt == attempts - 1:
                    raise RuntimeError(f"no free port could be bound on {host}; last log:\n" + "\n".join(self.log))

    def _drain(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.log.append(line.rstrip())

    def _wait_healthy(self, timeout_s: float) -> None:
        from pi0_reward_server.client_pool import health_url

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                time.sleep(0.2)  # the last lines of its log
                log = "\n".join(self.log)
                if "address already in use" in log.lower():
                    raise _PortTaken()
                raise RuntimeError(f"the model server exited with {self.process.returncode}; its log:\n{log}")
            try:
                with urllib.request.urlopen(health_url(self.url), timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.process.kill()
        raise TimeoutError(f"the model server at {self.url} did not load its models within {timeout_s:g}s; its log:\n"
                           + "\n".join(self.log))

    def info(self) -> dict[str, Any]:
        """Where it runs, for the pool's status."""
        context = ray.get_runtime_context()
        return {"url": self.url, "source": "ray", "node_ip": self.node_ip, "node_id": context.get_node_id(),
                "actor_id": context.get_actor_id(), "gpus": [str(g) for g in ray.get_gpu_ids()],
                "pid": self.process.pid}

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self) -> list[str]:
        return list(self.log)

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM (the server drains its in-flight requests), SIGKILL if it has not ended after ``grace_s``."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


class Registrar(Protocol):
    def add(self, url: str, where: dict[str, Any]) -> None: ...
    def remove(self, url: str) -> None: ...


class PoolRegistrar:
    """Servers join and leave a :class:`~pi0_reward_server.client_pool.ClientPool` in this process."""

    def __init__(self, pool) -> None:
        self.pool = pool

    def add(self, url: str, where: dict[str, Any]) -> None:
        self.pool.add_server(url, where)

    def remove(self, url: str) -> None:
        self.pool.remove_server(url)


class AppRegistrar:
    """Servers join and leave a running reward app through ``POST|DELETE /admin/pool/servers`` (its token);
    the app records membership in its job store, so every app process (gunicorn worker) follows."""

    def __init__(self, app_url: str, token: str, *, timeout_s: float = 10.0, attempts: int = 5,
                 launcher: str | None = None) -> None:
        """``launcher``: a name this launcher's servers are registered under (``where["launcher"]``), so a
        later launcher of the same name can remove what a killed one left registered (:meth:`remove_stale`)."""
        if not app_url.startswith(("http://", "https://")):
            raise ValueError(f"app URL {app_url!r} must start with http:// or https://")
        if not token:
            raise ValueError("registering with an app needs its token (REWARD_SERVER_TOKEN)")
        self.app_url = app_url.rstrip("/")
        self.endpoint = self.app_url + "/admin/pool/servers"
        self.token, self.timeout_s, self.attempts, self.launcher = token, timeout_s, attempts, launcher

    def _send(self, method: str, body: dict[str, Any] | None, *, missing_ok: bool = False,
              url: str | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url or self.endpoint, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        for attempt in range(self.attempts):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                if exc.code == 404 and missing_ok:
                    return {"url": (body or {}).get("url"), "removed": False}
                if exc.code < 500 or attempt == self.attempts - 1:  # refused: retrying will not help
                    raise RuntimeError(f"{method} {self.endpoint} answered {exc.code}: "
                                       f"{exc.read()[:300].decode(errors='replace')}") from None
            except (urllib.error.URLError, OSError):
                if attempt == self.attempts - 1:
                    raise
            time.sleep(min(0.5 * 2**attempt, 5.0))
        raise AssertionError("unreachable")

    def add(self, url: str, where: dict[str, Any]) -> None:
        if self.launcher is not None:
            where = {**where, "launcher": self.launcher}
        self._send("POST", {"url": url, "where": where})

    def remove_stale(self) -> list[str]:
        """Deregister the servers the app holds under this launcher's name: those of an earlier launcher of
        the same name that was killed before it could deregister them (membership never expires by itself).
        Their URLs."""
        if self.launcher is None:
            return []
        status = self._send("GET", None, url=self.app_url + "/pool_status")
        stale = [s["url"] for s in status.get("servers", []) if (s.get("where") or {}).get("launcher") == self.launcher]
        for url in stale:
            self.remove(url)
        return stale

    def remove(self, url: str) -> None:
        """A 404 (no app process and no record knows it: removed already, by hand or an earlier try whose
        answer was lost) is the outcome asked for, not an error."""
        self._send("DELETE", {"url": url}, missing_ok=True)


class ServerGroup:
    """Model server actors launched together: their URLs and where they run; stop them with :meth:`stop`."""

    def __init__(self, actors: list, infos: list[dict[str, Any]], registrar: Registrar | None = None) -> None:
        self._lock = threading.Lock()
        self._members = {info["url"]: (actor, info) for actor, info in zip(actors, infos)}
        self.registrar = registrar
        self._stop_watch = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def urls(self) -> list[str]:
        with self._lock:
            return list(self._members)

    @property
    def servers(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(info) for _, info in self._members.values()]

    def actor(self, url: str):
        with self._lock:
            return self._members[url][0]

    def check(self, timeout_s: float = 10.0) -> list[str]:
        """Drop, deregister and kill the servers whose actor or process is gone or does not answer (an actor
        kept would hold its GPU, and a hung one may still run a process); their URLs."""
        with self._lock:
            members = list(self._members.items())
        refs = {url: actor.alive.remote() for url, (actor, _) in members}
        dead = []
        for url, ref in refs.items():
            try:
                alive = ray.get(ref, timeout=timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                alive = False
            if not alive:
                dead.append(url)
        for url in dead:
            logger.warning("model server actor at %s is gone; it leaves the pool", url)
            with self._lock:
                entry = self._members.pop(url, None)
            self._deregister(url)
            if entry is not None:
                ray.kill(entry[0])  # its server process gets SIGTERM from the kernel (PR_SET_PDEATHSIG)
        return dead

    def watch(self, interval_s: float = 2.0, on_dead: Callable[[list[str]], None] | None = None) -> "ServerGroup":
        """Check every ``interval_s`` on a thread of its own until :meth:`stop`."""

        def loop() -> None:
            while not self._stop_watch.wait(interval_s):
                try:
                    dead = self.check()
                    if dead and on_dead is not None:
                        on_dead(dead)
                except Exception:  # noqa: BLE001 - a failed round is logged and the next one tries again
                    logger.error("checking the model server actors failed", exc_info=True)

        self._watcher = threading.Thread(target=loop, name="ray-server-watch", daemon=True)
        self._watcher.start()
        return self

    def _deregister(self, url: str) -> None:
        if self.registrar is None:
            return
        try:
            self.registrar.remove(url)
        except Exception:  # noqa: BLE001 - the pool's own health checks keep a dead server out meanwhile
            logger.error("could not deregister %s", url, exc_info=True)

    def stop(self, grace_s: float = 30.0) -> None:
        """Deregister every server first (no new work goes there), then let each drain and end its actor."""
        self._stop_watch.set()
        if self._watcher is not None:
            self._watcher.join(grace_s)
        with self._lock:
            members = list(self._members.items())
            self._members.clear()
        for url, _ in members:
            self._deregister(url)
        stops = [actor.stop.remote(grace_s) for _, (actor, _) in members]
        for ref in stops:
            try:
                ray.get(ref, timeout=grace_s + 15)
            except ray.exceptions.RayError:
                pass  # already dead
        for _, (actor, _) in members:
            ray.kill(actor)


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def launch_servers(count: int | None = None, *, server_args: Sequence[str] = (), num_gpus: float = 1.0,
                   num_cpus: float | None = None, bind_host: str | None = None, env: dict[str, str] | None = None,
                   registrar: Registrar | None = None, ready_timeout_s: float = 300.0) -> ServerGroup:
    """Start ``count`` model servers as Ray actors (default: one per GPU in the cluster), spread over the nodes.

    ``num_gpus=1`` gives each its own GPU; ``num_gpus=0`` with ``num_cpus`` runs CPU servers. ``server_args``
    go to ``python -m gpu_worker`` as they are (``--model ...``, ``--max-batch-size ...``); host and port are
    the launcher's. Each server joins ``registrar`` once it answers ``/healthz``. Needs ``ray.init`` first."""
    if not ray.is_initialized():
        raise RuntimeError("connect to a Ray cluster first: ray.init(address='auto') (or start one: ray start --head)")
    if num_gpus < 0 or (num_cpus is not None and num_cpus < 0):
        raise ValueError(f"num_gpus and num_cpus must not be negative, got {num_gpus} and {num_cpus}")
    bad = [a for a in server_args if a in ("--host", "--port") or a.startswith(("--host=", "--port="))]
    if bad:
        raise ValueError(f"server_args must not set {bad}: each actor binds its node's address on a free port")
    if count is None:
        if num_gpus <= 0:
            raise ValueError("give a count of CPU model servers (num_gpus=0 cannot be counted from GPUs)")
        count = int(cluster_gpus() // num_gpus)
        if count == 0:
            raise RuntimeError("the Ray cluster has no GPU: start CPU model servers (count=N, num_gpus=0)")
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    actor_class = ray.remote(ModelServer).options(
        num_gpus=num_gpus, num_cpus=num_cpus if num_cpus is not None else (0 if num_gpus else 1),
        scheduling_strategy="SPREAD", max_restarts=0)
    actors = [actor_class.remote(list(server_args), bind_host=bind_host, env=env, ready_timeout_s=ready_timeout_s)
              for _ in range(count)]
    try:
        infos = ray.get([actor.info.remote() for actor in actors], timeout=ready_timeout_s + 60)
    except BaseException:
        for actor in actors:
            ray.kill(actor)
        raise
    group = ServerGroup(actors, infos, registrar)
    if registrar is not None:
        registered = []
        try:
            for info in infos:
                registrar.add(info["url"], info)
                registered.append(info["url"])
        except BaseException:  # all or none: no server stays registered, no actor keeps its GPU
            for url in registered:
                group._deregister(url)
            for actor in actors:
                ray.kill(actor)
            raise
    logger.info("started %d model server(s) on Ray: %s", count, ", ".join(i["url"] for i in infos))
    return group
