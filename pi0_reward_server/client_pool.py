"""A thread-safe pool of connections to openpi-compatible model servers.

Rules it keeps:

* a borrowed connection belongs to one borrower until it is given back; a
  connection is never used by two threads at once;
* connections are reused, and ``connections_per_server`` are opened ahead of
  time; more are opened on demand up to ``max_connections_per_server``;
* ``acquire`` picks the healthy server with the fewest requests in flight
  (ties: the one that has served fewest), and raises :class:`PoolTimeout`
  when nothing frees up in time;
* a connection that errors or times out is closed and never handed out again,
  so a late reply can never become someone else's answer; a server whose
  connection broke, or that let a request time out without answering anything
  on any connection meanwhile (hung, not merely queued), leaves rotation;
* a server out of rotation is probed cheaply (``GET /healthz``) every
  ``probe_interval_s``; only when that answers does the pool reconnect, and
  a failed reconnect backs off exponentially (``backoff_initial_s`` up to
  ``backoff_max_s``), so a server that comes back rejoins within about one
  probe interval however long it was away. A server that timed out must also
  answer a real inference (the last observation any server answered, else
  zeros shaped from a gpu_worker's metadata) before it rejoins: a hung server
  that still answers ``/healthz`` stays out. Only with nothing to probe with
  (an openpi server before any request succeeded) does ``/healthz`` let it
  back, with its backoff kept until a real request succeeds there;
* :meth:`ClientPool.infer` retries on another server when the first one died,
  timed out, was overloaded or is shutting down, so a task's result is
  neither lost nor duplicated; a request the server rejects as bad (or a model
  exception) is not retried;
* what a server can do is read from its metadata frame. A server that announces
  ``explicit_batch`` (gpu_worker) gets a step's observations as one list frame;
  any other (openpi's ``WebsocketPolicyServer``) gets exactly one observation
  map per frame, and :meth:`ClientPool.infer_batch` spreads the maps over
  several connections and servers at once. ``__model__`` goes only to servers
  that announce model selection; one that does not serves its one policy;
* membership can change while it runs (:meth:`ClientPool.add_server`,
  :meth:`ClientPool.remove_server`): a new server enters through the same
  probe as one coming back; a removed one takes no new request, and its
  borrowed connections are closed as they are given back, so a request in
  flight there still gets its one answer (or its retry elsewhere).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Iterator

import numpy as np
import websockets

from gpu_worker.client import ModelClient, ServerError, admin_call
from gpu_worker.wire import WireError
from pi0_reward_server import metrics

logger = logging.getLogger(__name__)

UP, DOWN, CONNECTING = "up", "down", "connecting"
_RETRYABLE_REPLIES = ("overloaded", "server is shutting down")
_CONNECTION_ERRORS = (websockets.ConnectionClosed, websockets.InvalidHandshake, OSError, EOFError, WireError)


class PoolError(RuntimeError):
    """Base of the pool's errors."""


class PoolTimeout(PoolError):
    """No connection became available within the acquire timeout."""


class InferenceFailed(PoolError):
    """Every attempt failed on a retryable error; the message holds the last one."""


class RequestRejected(PoolError):
    """The request itself was refused (too large, or its reply undecodable): retrying elsewhere would not help."""


class _OneMapPerFrame(Exception):
    """The borrowed connection's server takes one observation map per frame: split the batch."""


def _request_was_at_fault(exc: BaseException) -> bool:
    if isinstance(exc, WireError):
        return True
    received = getattr(exc, "rcvd", None)
    return isinstance(exc, websockets.ConnectionClosed) and received is not None and received.code == 1009


def check_server_url(url: Any) -> str:
    """A model server URL must be ``ws://host:port`` (or wss): anything else is refused here, by name."""
    parsed = urllib.parse.urlparse(url) if isinstance(url, str) else None
    try:
        port = parsed.port if parsed is not None else None
    except ValueError:
        port = None
    if parsed is None or parsed.scheme not in ("ws", "wss") or not parsed.hostname or not port:
        raise ValueError(f"model server URL {str(url)[:200]!r} must look like ws://host:port")
    return url


def health_url(ws_url: str) -> str:
    parsed = urllib.parse.urlparse(ws_url)
    scheme = "https" if parsed.scheme == "wss" else "http"
    return f"{scheme}://{parsed.netloc}/healthz"


@dataclasses.dataclass(eq=False)
class _Server:
    url: str
    state: str = CONNECTING
    idle: collections.deque = dataclasses.field(default_factory=collections.deque)
    busy: int = 0
    opening: int = 0
    requests: int = 0
    errors: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    latencies_ms: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=2048))
    backoff_s: float = 0.0
    next_check: float = 0.0  # next cheap probe while out of rotation
    reconnect_at: float = 0.0  # no reconnect before this (backoff after a failed one)
    needs_inference: bool = False  # it timed out: /healthz alone cannot bring it back
    checking: bool = False  # a check of this server is running on its own thread
    last_reply_at: float = 0.0  # when any of its connections last got a reply
    last_healthy_check: float = 0.0
    kind: str | None = None  # from the metadata frame: "gpu_worker", or "openpi-compatible"
    explicit_batch: bool | None = None  # None until a connection has read the metadata
    versions: dict = dataclasses.field(default_factory=dict)  # hosted model -> version, from the metadata
    default_model: str | None = None
    batch_rows: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=256))
    where: dict = dataclasses.field(default_factory=dict)  # where it runs (node, Ray actor), as its registrar said
    removed: bool = False  # taken out of the pool: no new requests; its connections close when given back

    @property
    def load(self) -> int:
        return self.busy + self.opening

    @property
    def connections(self) -> int:
        return self.busy + self.opening + len(self.idle)


class ClientPool:
    def __init__(
        self,
        urls: list[str] | tuple[str, ...],
        *,
        connections_per_server: int = 2,
        max_connections_per_server: int = 64,
        acquire_timeout_s: float = 60.0,
        request_timeout_s: float = 120.0,
        connect_timeout_s: float = 5.0,
        health_interval_s: float = 2.0,
        probe_interval_s: float = 1.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        retries: int = 2,
        api_key: str | None = None,
        client_factory: Callable[..., ModelClient] = ModelClient,
        report_gauges: bool = True,
        allow_empty: bool = False,
        lazy_connections: bool = False,
    ) -> None:
        for url in urls:
            check_server_url(url)
        if not urls and not allow_empty:
            raise ValueError("a ClientPool needs at least one model server URL")
        if len(set(urls)) != len(urls):
            raise ValueError(f"model server URLs must be distinct, got {list(urls)}")
        self._servers = [_Server(url) for url in urls]
        self.connections_per_server = connections_per_server
        self.max_connections_per_server = max_connections_per_server
        self.acquire_timeout_s = acquire_timeout_s
        self.request_timeout_s = request_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.health_interval_s = health_interval_s
        self.probe_interval_s = probe_interval_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.retries = retries
        self._api_key = api_key
        self._client_factory = client_factory
        self._report_gauges = report_gauges  # the per-server gauges: the app's own pool, not its helpers'
        # A server in rotation on /healthz alone, connections opened on first use: for the many small pools
        # of Ray workers, most of which never talk to most servers.
        self.lazy_connections = lazy_connections
        self._cond = threading.Condition()
        self._fanout: concurrent.futures.ThreadPoolExecutor | None = None
        self._probe: tuple[dict[str, Any], str | None] | None = None  # (observation, model) some server answered
        self._versions_read_at = float("-inf")
        self._closed = False
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._maintain, name="client-pool-health", daemon=True)

    # -- lifecycle --------------------------------------------------------
    def start(self, wait_s: float | None = None) -> "ClientPool":
        """Start the health thread; with ``wait_s``, wait until a server is up (or the time passes)."""
        self._thread.start()
        if wait_s:
            self.wait_for_servers(1, wait_s)
        return self

    def wait_for_servers(self, count: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while sum(s.state == UP for s in self._servers) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            to_close = [c for s in self._servers for c in s.idle]
            for s in self._servers:
                s.idle.clear()
            self._cond.notify_all()
        self._wake.set()
        for conn in to_close:
            _quiet_close(conn)
        if self._fanout is not None:
            self._fanout.shutdown(wait=False, cancel_futures=True)
        if self._thread.is_alive():
            self._thread.join(5)

    def __enter__(self) -> "ClientPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def healthy_servers(self) -> int:
        with self._cond:
            return sum(s.state == UP for s in self._servers)

    # -- membership -------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def urls(self) -> list[str]:
        with self._cond:
            return [s.url for s in self._servers]

    def add_server(self, url: str, where: dict[str, Any] | None = None) -> bool:
        """Add a model server (True), or update where an existing one runs (False). It enters rotation
        through the health thread's probe and connect, like a server coming back; no restart needed."""
        check_server_url(url)
        with self._cond:
            added = self._add_locked(url, where)
        self._after_change([url] if added else [], [])
        return added

    def remove_server(self, url: str) -> bool:
        """Take a model server out of the pool (True; False when it was not in it). Requests in flight
        there finish or fail over as usual; their connections are closed when given back."""
        with self._cond:
            to_close = self._remove_locked(url)
        if to_close is None:
            return False
        self._after_change([], [url], to_close)
        return True

    def set_servers(self, urls: list[str], where: dict[str, dict] | None = None) -> tuple[list[str], list[str]]:
        """Make the pool hold exactly ``urls``: (added, removed). The diff is taken and applied under one
        lock, so an add or remove by another thread lands wholly before or after it, never in between."""
        where = where or {}
        for url in urls:
            check_server_url(url)
        wanted = set(urls)
        to_close: list[ModelClient] = []
        with self._cond:
            removed = [s.url for s in self._servers if s.url not in wanted]
            for url in removed:
                to_close += self._remove_locked(url) or []
            added = [u for u in urls if self._add_locked(u, where.get(u))]
        self._after_change(added, removed, to_close)
        return added, removed

    def _add_locked(self, url: str, where: dict[str, Any] | None) -> bool:
        if self._closed:
            raise PoolError("the client pool is closed")
        for server in self._servers:
            if server.url == url:
                server.where = dict(where or server.where)
                return False
        self._servers.append(_Server(url, where=dict(where or {})))
        self._cond.notify_all()
        return True

    def _remove_locked(self, url: str) -> list[ModelClient] | None:
        """Take ``url`` out (its idle connections, to close outside the lock), or None if it was not in.
        Its gauge series go here, under the lock, so the health thread cannot write them back."""
        server = next((s for s in self._servers if s.url == url), None)
        if server is None:
            return None
        self._servers.remove(server)
        server.removed = True
        server.state = DOWN
        to_close = list(server.idle)
        server.idle.clear()
        self._cond.notify_all()
        if self._report_gauges:
            metrics.forget_server(url)
        return to_close

    def _after_change(self, added: list[str], removed: list[str], to_close: list[ModelClient] = ()) -> None:
        for conn in to_close:
            _quiet_close(conn)
        if added:
            self._wake.set()
        for url in added:
            logger.info("model server %s joined the pool", url)
        for url in removed:
            logger.info("model server %s left the pool", url)

    # -- borrowing --------------------------------------------------------
    def _open(self, server: _Server) -> ModelClient:
        options: dict[str, Any] = {"open_timeout": self.connect_timeout_s, "timeout": self.request_timeout_s}
        if self._api_key:
            options["api_key"] = self._api_key
        conn = self._client_factory(server.url, **options)
        server.kind = getattr(conn, "server_name", None)
        server.explicit_batch = bool(getattr(conn, "explicit_batch", False))
        metadata = getattr(conn, "metadata", None)
        models = metadata.get("models") if isinstance(metadata, dict) else None
        if isinstance(models, dict):
            if not server.versions:  # a first read; later ones come from GET /status (a connection may be older)
                server.versions = {name: str(m.get("version")) for name, m in models.items()
                                   if isinstance(m, dict) and m.get("version") is not None}
            server.default_model = metadata.get("default_model")
        else:
            server.versions, server.default_model = {}, None
        return conn

    def refresh_versions(self, max_age_s: float = 1.0) -> None:
        """Read the versions each gpu_worker in rotation serves now (``GET /status``), unless read less than
        ``max_age_s`` ago: a model reloaded through another app process must not be taken for the old one."""
        with self._cond:
            if time.monotonic() - self._versions_read_at < max_age_s:
                return
            read_at = time.monotonic()
            servers = [s for s in self._servers if s.state == UP and s.kind == "gpu_worker"]
        headers = {"Authorization": f"Api-Key {self._api_key}"} if self._api_key else {}
        for server in servers:
            url = health_url(server.url).removesuffix("/healthz") + "/status"
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                            timeout=self.connect_timeout_s) as response:
                    models = json.loads(response.read()).get("models", {})
                versions = {name: str(m["version"]) for name, m in models.items() if m.get("version") is not None}
            except Exception as exc:  # noqa: BLE001 - unknown now: no cache for its models until it answers
                logger.info("could not read the model versions of %s: %s", server.url, exc)
                versions = {}
            with self._cond:
                server.versions = versions
        with self._cond:
            self._versions_read_at = max(self._versions_read_at, read_at)  # once read, not when asked

    def model_version(self, model: str | None) -> str | None:
        """``name@version`` of a hosted model (None: the servers' default) as every server in rotation
        reports it; None when a server does not report versions (openpi's) or the servers disagree."""
        self.refresh_versions()
        with self._cond:
            seen = set()
            for server in self._servers:
                if server.state != UP:
                    continue
                name = model if model is not None else server.default_model
                version = server.versions.get(name) if name is not None else None
                if version is None:
                    return None
                seen.add(f"{name}@{version}")
        return seen.pop() if len(seen) == 1 else None

    def _pick(self, exclude: set[_Server], prefer: str | None, batch: bool = False) -> _Server | None:
        up = [s for s in self._servers if s.state == UP]
        candidates = [s for s in up if s not in exclude] or up
        usable = [s for s in candidates if s.idle or s.connections < self.max_connections_per_server]
        if not usable:
            return None
        # Least loaded first; on a tie a batch goes where it fits in one frame, then stays where the caller
        # was (a warm server), then goes to the one that served fewest.
        return min(usable, key=lambda s: (s.load, batch and not s.explicit_batch, s.url != prefer, s.requests))

    def _acquire(
        self, timeout_s: float | None, exclude: set[_Server], prefer: str | None = None, batch: bool = False
    ) -> tuple[_Server, ModelClient]:
        timeout_s = self.acquire_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        raise PoolError("the client pool is closed")
                    server = self._pick(exclude, prefer, batch)
                    if server is not None:
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise PoolTimeout(
                            f"no model server connection became free within {timeout_s:g}s; servers: "
                            + ", ".join(f"{s.url} {s.state} ({s.busy} busy)" for s in self._servers)
                        )
                    self._cond.wait(remaining)
                if server.idle:
                    server.busy += 1
                    return server, server.idle.pop()
                server.opening += 1
            try:  # open a new connection outside the lock
                conn = self._open(server)
            except Exception as exc:  # noqa: BLE001 - any failure to connect marks the server down
                with self._cond:
                    server.opening -= 1
                self._mark_down(server, f"connect failed: {type(exc).__name__}: {exc}")
                continue
            except BaseException:
                with self._cond:
                    server.opening -= 1
                    self._cond.notify_all()
                raise
            with self._cond:
                server.opening -= 1
                if server.removed:  # taken out while this connection opened: no new request goes there
                    self._cond.notify_all()
                else:
                    server.busy += 1
                    return server, conn
            _quiet_close(conn)

    def _release(self, server: _Server, conn: ModelClient, *, keep: bool) -> None:
        with self._cond:
            server.busy -= 1
            if keep and server.state == UP and not self._closed and not getattr(conn, "broken", False):
                server.idle.append(conn)
                conn = None
            # Every waiter: one whose retry excludes this server must not swallow the only wake-up.
            self._cond.notify_all()
        if conn is not None:
            _quiet_close(conn)

    @contextlib.contextmanager
    def connection(self, timeout_s: float | None = None) -> Iterator[tuple[str, ModelClient]]:
        """Borrow ``(server_url, client)`` for exclusive use. An exception inside
        the block discards the connection instead of returning it."""
        server, conn = self._acquire(timeout_s, set())
        try:
            yield server.url, conn
        except BaseException as exc:
            self._release(server, conn, keep=False)
            if isinstance(exc, _CONNECTION_ERRORS):
                self._mark_down(server, f"{type(exc).__name__}: {exc}")
            raise
        self._release(server, conn, keep=True)

    # -- inference with retry ---------------------------------------------
    def infer(
        self, obs: dict[str, Any], *, prefer: str | None = None, model: str | None = None
    ) -> tuple[dict[str, Any], str]:
        """One observation -> (action map, URL of the server that answered).

        ``prefer``: a server URL to use when it is no busier than the others
        (a sequential caller stays on a warm server). ``model``: the hosted
        model to ask, on servers that host several (see the module's notes)."""
        reply = self._call(lambda conn: conn.infer(_addressed(conn, obs, model)), prefer)
        self._probe = (obs, model)
        return reply

    def infer_batch(
        self, observations: list[dict[str, Any]], *, prefer: str | None = None, model: str | None = None
    ) -> tuple[list[dict[str, Any]], str]:
        """Many observations -> (their action maps in order, URL of the server that answered the first).

        One explicit batch frame where the server takes one; otherwise one map
        per frame, spread over several connections at once."""
        observations = list(observations)
        if not observations:
            raise ValueError("infer_batch needs at least one observation")
        if len(observations) == 1:
            reply, url = self.infer(observations[0], prefer=prefer, model=model)
            return [reply], url

        def send(conn: ModelClient) -> list[dict[str, Any]]:
            if not getattr(conn, "explicit_batch", False):
                raise _OneMapPerFrame
            return conn.infer_batch([_addressed(conn, obs, model) for obs in observations])

        try:
            replies = self._call(send, prefer, batch=True)
            self._probe = (observations[0], model)
            return replies
        except _OneMapPerFrame:
            return self._infer_each(observations, prefer, model)

    def _infer_each(
        self, observations: list[dict[str, Any]], prefer: str | None, model: str | None
    ) -> tuple[list[dict[str, Any]], str]:
        """One map per frame, on as many concurrent streams as the usable servers have warm connections
        (a serial server gains nothing from more): the caller runs one stream, the fan-out threads the rest."""
        with self._cond:
            up = max(1, sum(s.state == UP for s in self._servers))
        streams = min(len(observations), up * max(1, self.connections_per_server))
        replies: list[Any] = [None] * len(observations)
        urls: list[str | None] = [None] * len(observations)
        failed = threading.Event()

        def run(stream: int, prefer_url: str | None) -> None:
            try:
                for i in range(stream, len(observations), streams):
                    if failed.is_set():
                        return  # another stream failed: the step fails, so send no more for it
                    replies[i], urls[i] = self.infer(observations[i], prefer=prefer_url, model=model)
            except BaseException:
                failed.set()
                raise

        futures = [self._fanout_executor().submit(run, stream, None) for stream in range(1, streams)]
        error: BaseException | None = None
        try:
            run(0, prefer)
        except BaseException as exc:  # noqa: BLE001 - raised below, once every stream has stopped
            error = exc
        for future in futures:  # wait for all: no frame of this step may still be in flight when it fails
            try:
                future.result()
            except BaseException as exc:  # noqa: BLE001
                error = error or exc
        if error is not None:
            raise error
        return replies, urls[0]

    def _fanout_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._cond:
            if self._closed:
                raise PoolError("the client pool is closed")
            if self._fanout is None:
                workers = min(64, max(4, len(self._servers)) * self.max_connections_per_server)  # servers may join later
                self._fanout = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="pool-fanout")
            return self._fanout

    def _call(self, fn: Callable[[ModelClient], Any], prefer: str | None = None, batch: bool = False) -> tuple[Any, str]:
        tried: set[_Server] = set()
        last_error = "no attempt made"
        for attempt in range(self.retries + 1):
            server, conn = self._acquire(None, tried, prefer, batch)
            started = time.monotonic()
            try:
                result = fn(conn)
            except ServerError as exc:
                message = str(exc)
                keep = _keeps_connection_after_error(conn)
                self._release(server, conn, keep=keep)
                self._record_error(server, message)
                if not message.startswith(_RETRYABLE_REPLIES):
                    raise
                metrics.pool_retries.labels(server.url).inc()
                tried.add(server)
                last_error = f"{server.url}: {message}"
                time.sleep(min(0.05 * 2**attempt, 1.0))  # back off before asking again
                continue
            except TimeoutError as exc:
                # The server may still answer later: this connection must never be reused. A server that
                # answered nothing on any connection meanwhile is hung: it leaves rotation until it answers a
                # real inference again. One that did answer is only slow or queued (a serial server under
                # load), and stays in rotation.
                self._release(server, conn, keep=False)
                message = f"no reply within {self.request_timeout_s:g}s"
                if server.last_reply_at < started:
                    self._mark_down(server, message, needs_inference=True)
                else:
                    self._record_error(server, message + " (it answered others meanwhile: slow, not hung)")
                metrics.pool_retries.labels(server.url).inc()
                tried.add(server)
                last_error = f"{server.url}: timed out after {self.request_timeout_s:g}s ({exc})"
                continue
            except _CONNECTION_ERRORS as exc:
                self._release(server, conn, keep=False)
                if _request_was_at_fault(exc):
                    self._record_error(server, f"{type(exc).__name__}: {exc}")
                    raise RequestRejected(f"{server.url} refused the request: {exc}") from exc
                self._mark_down(server, f"{type(exc).__name__}: {exc}")
                metrics.pool_retries.labels(server.url).inc()
                tried.add(server)
                last_error = f"{server.url}: {type(exc).__name__}: {exc}"
                continue
            except _OneMapPerFrame:
                self._release(server, conn, keep=True)  # nothing was sent
                raise
            except BaseException:  # anything else (a value that cannot be packed, an interrupt): not the server's fault
                self._release(server, conn, keep=False)
                raise
            with self._cond:
                _note_reply(server, result)
                server.requests += 1
                server.last_reply_at = time.monotonic()
                server.latencies_ms.append((server.last_reply_at - started) * 1000)
                if server.needs_inference:  # it rejoined without a probe (none was known) and has now answered
                    server.needs_inference = False
                    server.backoff_s = 0.0
            metrics.pool_requests.labels(server.url).inc()
            metrics.pool_seconds.labels(server.url).observe(time.monotonic() - started)
            self._release(server, conn, keep=True)
            return result, server.url
        raise InferenceFailed(f"inference failed after {self.retries + 1} attempt(s); last error: {last_error}")

    # -- health -----------------------------------------------------------
    def _record_error(self, server: _Server, message: str) -> None:
        metrics.pool_errors.labels(server.url).inc()  # wherever server.errors counts, the metric does too
        with self._cond:
            server.errors += 1
            server.last_error = message
            server.last_error_at = time.time()

    def _mark_down(self, server: _Server, message: str, *, needs_inference: bool = False) -> None:
        metrics.pool_errors.labels(server.url).inc()
        with self._cond:
            server.errors += 1
            server.last_error = message
            server.last_error_at = time.time()
            server.needs_inference = server.needs_inference or needs_inference
            to_close = list(server.idle)
            server.idle.clear()
            if server.state != DOWN:
                logger.warning("model server %s is out of rotation: %s", server.url, message)
                server.state = DOWN
                server.next_check = time.monotonic()  # probe it right away
            self._cond.notify_all()
        self._wake.set()
        for conn in to_close:
            _quiet_close(conn)

    def _healthy(self, url: str) -> bool:
        try:
            with urllib.request.urlopen(health_url(url), timeout=self.connect_timeout_s) as response:
                return response.status == 200
        except urllib.error.HTTPError as exc:
            # A WebSocket-only server with no /healthz answers 426 Upgrade Required: it is alive.
            return exc.code == 426
        except Exception:  # noqa: BLE001 - anything that is not a 200 from /healthz (garbage, resets) is unhealthy
            return False

    def _probe_inference(self, conn: ModelClient) -> tuple[bool, str | None]:
        """A real inference on a fresh connection: (whether one was sent, what went wrong or None).

        The probe is the last observation any server answered, else (gpu_worker) zeros shaped from the
        metadata. With neither there is nothing to send."""
        probe = self._probe or _probe_from_metadata(conn)
        if probe is None:
            return False, None
        obs, model = probe
        try:
            conn.infer(_addressed(conn, obs, model))
        except ServerError as exc:
            message = str(exc)
            if not _keeps_connection_after_error(conn):
                conn.broken = True  # openpi's server closes a connection after an error reply
            # An answer, even an error, shows the server is alive; only overload and shutdown keep it out.
            return True, (f"probe inference: {message[:200]}" if message.startswith(_RETRYABLE_REPLIES) else None)
        except Exception as exc:  # noqa: BLE001 - timeouts, resets: it is still not serving
            conn.broken = True
            return True, f"probe inference failed: {type(exc).__name__}: {exc}"
        return True, None

    def _try_bring_up(self, server: _Server) -> None:
        """Cheap probe on a fixed interval; the expensive reconnect (and probe inference) with backoff."""
        now = time.monotonic()
        if not self._healthy(server.url):
            with self._cond:
                server.state = DOWN
                server.last_error = server.last_error or "GET /healthz did not answer 200"
                server.next_check = time.monotonic() + self.probe_interval_s
            return
        if now < server.reconnect_at:
            with self._cond:
                server.next_check = min(server.reconnect_at, now + self.probe_interval_s)
            return
        error = None
        opened: list[ModelClient] = []
        ahead = 0 if self.lazy_connections and not server.needs_inference else max(1, self.connections_per_server)
        for _ in range(ahead):
            try:
                opened.append(self._open(server))
            except Exception as exc:  # noqa: BLE001
                error = f"connect failed: {type(exc).__name__}: {exc}"
                break
        probed = False
        if opened and error is None and server.needs_inference:
            probed, error = self._probe_inference(opened[0])
        usable = [c for c in opened if not getattr(c, "broken", False)]
        with self._cond:
            if server.removed:
                pass  # taken out while it was being checked: its fresh connections are closed below
            elif (usable or not ahead) and error is None and not self._closed:
                was = server.state
                server.state = UP
                server.reconnect_at = 0.0
                if probed or not server.needs_inference:
                    server.backoff_s = 0.0
                    server.needs_inference = False
                else:  # back on /healthz alone (nothing to probe with): a real request must still succeed there
                    server.backoff_s = min(max(server.backoff_s * 2, self.backoff_initial_s), self.backoff_max_s)
                server.last_healthy_check = time.monotonic()
                server.idle.extend(usable)
                opened = [c for c in opened if c not in usable]
                self._cond.notify_all()
                if was == DOWN:
                    logger.info("model server %s is back in rotation", server.url)
            else:
                server.state = DOWN
                server.last_error = error or server.last_error
                server.backoff_s = min(max(server.backoff_s * 2, self.backoff_initial_s), self.backoff_max_s)
                server.reconnect_at = time.monotonic() + server.backoff_s
                server.next_check = time.monotonic() + self.probe_interval_s
        for conn in opened:
            _quiet_close(conn)

    def _check(self, server: _Server) -> None:
        try:
            if server.state != UP:
                self._try_bring_up(server)
            elif self._healthy(server.url):
                server.last_healthy_check = time.monotonic()
            else:
                self._mark_down(server, "GET /healthz failed")
        except Exception:  # noqa: BLE001 - a check must outlive any one server's oddities
            logger.error("health check of %s failed", server.url, exc_info=True)
            with self._cond:
                server.next_check = time.monotonic() + self.probe_interval_s
        finally:
            with self._cond:
                server.checking = False

    def _maintain(self) -> None:
        """Start each due check on its own thread: a server that hangs a probe delays no other server."""
        observed = 0.0
        while not self._closed:
            now = time.monotonic()
            if self._report_gauges and now - observed >= 1.0:  # the metrics' view of each server, once a second
                observed = now
                with self._cond:  # under the lock: a server removed meanwhile must not get its series back
                    for s in self._servers:
                        metrics.pool_up.labels(s.url).set(1 if s.state == UP else 0)
                        metrics.pool_in_flight.labels(s.url).set(s.busy)
            with self._cond:
                due = [s for s in self._servers if not s.checking and (
                    (s.state != UP and now >= s.next_check)
                    or (s.state == UP and now - s.last_healthy_check >= self.health_interval_s))]
                for server in due:
                    server.checking = True
            for server in due:
                try:
                    threading.Thread(target=self._check, args=(server,), name="client-pool-check", daemon=True).start()
                except RuntimeError:  # no thread to be had now: try this server again on a later round
                    logger.error("cannot start a health check thread for %s", server.url, exc_info=True)
                    with self._cond:
                        server.checking = False
            self._wake.wait(0.05)
            self._wake.clear()

    # -- status -----------------------------------------------------------
    def reload(self, model: str, checkpoint: str, *, timeout_s: float = 600.0) -> list[dict[str, Any]]:
        """Ask every model server, at once, to load ``checkpoint`` for hosted ``model``; one outcome per server
        (``url``, ``ok``, ``version``, ``previous_version``, ``error``, ``seconds``), in the pool's order. A
        server that is down or cannot reload (openpi's) is reported, not skipped."""
        with self._cond:
            servers = [(s, s.url, s.state, s.kind) for s in self._servers]

        def one(server: _Server, url: str, state: str, kind: str | None) -> dict[str, Any]:
            started = time.monotonic()
            outcome: dict[str, Any] = {"url": url, "state": state, "ok": False}
            if kind is not None and kind != "gpu_worker":
                outcome["error"] = f"a {kind} server cannot reload; restart it with the new checkpoint"
                return outcome
            try:
                answer = admin_call(url, {"command": "reload", "model": model, "checkpoint": checkpoint},
                                    api_key=self._api_key, timeout=timeout_s, open_timeout=self.connect_timeout_s)
            except Exception as exc:  # noqa: BLE001 - unreachable, refused, timed out: reported per server
                outcome["error"] = f"{type(exc).__name__}: {exc}"
            else:
                outcome.update(answer)
            outcome["seconds"] = round(time.monotonic() - started, 3)
            return outcome

        with concurrent.futures.ThreadPoolExecutor(len(servers), thread_name_prefix="pool-reload") as executor:
            outcomes = list(executor.map(lambda args: one(*args), servers))
        self.refresh_versions(max_age_s=0)  # what each serves now, from the servers themselves
        return outcomes

    def status(self) -> dict[str, Any]:
        """What /pool_status shows: each server's state, load, counters, latency; and totals."""
        with self._cond:
            servers = []
            for s in self._servers:
                latencies = list(s.latencies_ms)
                servers.append({
                    "url": s.url,
                    "state": s.state,
                    "server": s.kind,
                    "explicit_batch": s.explicit_batch,
                    "in_flight": s.busy,
                    "idle_connections": len(s.idle),
                    "busy_connections": s.busy,
                    "requests": s.requests,
                    "errors": s.errors,
                    "last_error": s.last_error,
                    "last_error_at": s.last_error_at,
                    "latency_ms": {
                        "p50": round(float(np.percentile(latencies, 50)), 3) if latencies else None,
                        "p99": round(float(np.percentile(latencies, 99)), 3) if latencies else None,
                    },
                    "retry_in_s": round(max(0.0, s.next_check - time.monotonic()), 2) if s.state == DOWN else None,
                    "reconnect_in_s": round(max(0.0, s.reconnect_at - time.monotonic()), 2) if s.state == DOWN else None,
                    "needs_inference": s.needs_inference,
                    "versions": dict(s.versions),
                    "where": dict(s.where),
                    "batch_rows_mean": round(float(np.mean(s.batch_rows)), 2) if s.batch_rows else None,
                })
        return {
            "servers": servers,
            "totals": {
                "servers": len(servers),
                "up": sum(s["state"] == UP for s in servers),
                "in_flight": sum(s["in_flight"] for s in servers),
                "requests": sum(s["requests"] for s in servers),
                "errors": sum(s["errors"] for s in servers),
            },
        }


def _note_reply(server: _Server, result: Any) -> None:
    """What a reply tells about its server: the size of the forward pass that answered. (Not the version it
    names: a reply from a batch that ran across a reload could name the old one after the new one was
    read; versions come from GET /status.) Called under the pool's lock."""
    first = result[0] if isinstance(result, list) and result else result
    timing = first.get("server_timing") if isinstance(first, dict) else None
    rows = timing.get("batch_size") if isinstance(timing, dict) else None
    if isinstance(rows, (int, float)) and not isinstance(rows, bool):
        server.batch_rows.append(rows)  # the size of the forward pass that answered (gpu_worker reports it)


def _probe_from_metadata(conn: ModelClient) -> tuple[dict[str, Any], str | None] | None:
    """Zeros for every input of a gpu_worker's default model, from its metadata frame; None elsewhere."""
    metadata = conn.metadata if isinstance(conn.metadata, dict) else {}
    models, name = metadata.get("models"), metadata.get("model")
    spec = models.get(name, {}).get("inputs") if isinstance(models, dict) and isinstance(models.get(name), dict) else None
    if not getattr(conn, "selects_models", False) or not isinstance(spec, dict):
        return None
    obs: dict[str, Any] = {}
    try:
        for key, entry in spec.items():
            if entry["dtype"] == "str":
                obs[key] = ""
            else:
                obs[key] = np.zeros([1 if d == -1 else int(d) for d in entry["shape"]], dtype=np.dtype(entry["dtype"]))
    except (KeyError, TypeError, ValueError):
        return None
    return obs, name


def _addressed(conn: ModelClient, obs: dict[str, Any], model: str | None) -> dict[str, Any]:
    """``obs`` with ``__model__`` where the server picks models by it; as given elsewhere."""
    if model is None or not getattr(conn, "selects_models", False):
        return obs
    return {**obs, "__model__": model}


def _keeps_connection_after_error(conn: ModelClient) -> bool:
    """gpu_worker keeps a connection usable after an error reply; openpi's server closes it."""
    server = conn.metadata.get("server") if isinstance(conn.metadata, dict) else None
    return isinstance(server, dict) and server.get("name") == "gpu_worker"


def _quiet_close(conn: ModelClient) -> None:
    """Close without blocking the caller: a hung server would stall the closing handshake."""

    def close() -> None:
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - closing a broken connection may fail; it is gone either way
            pass

    threading.Thread(target=close, name="close-connection", daemon=True).start()
