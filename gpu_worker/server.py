"""The WebSocket transport: openpi's wire protocol over a dynamic batcher.

Requests are answered from the protocol callback (:class:`_Connection`): a whole
data message is decoded (large frames on a small thread pool), then queued on
its model's batcher thread (:mod:`gpu_worker.batching`), whose answers come back
to the loop in one wake-up per batch, and each reply is written as soon as it and
every earlier reply of its connection are ready. The one exception: a lone small
request (no other connection active) to a model whose forward passes take under
2 ms runs inline on the loop, where there is nothing to batch it with and nobody
else to stall.

Besides WebSocket connections the port answers ``GET /healthz``, ``GET /status``
(versions), ``GET /metrics`` (Prometheus) and admin calls on ``/admin`` (hot reload).

Per connection, after the metadata frame: one reply frame per request frame, in
request order (clients may pipeline; reading pauses at 16 unanswered). A request
error is answered with a text frame holding the message, and the connection stays
usable.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import gc
import hmac
import ipaddress
import json
import logging
import queue
import signal
import threading
import time
from typing import Any, Callable

import websockets
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.frames import Frame, Opcode
from websockets.protocol import State as WsState
from websockets.http11 import Request, Response

from gpu_worker import __version__, wire
from gpu_worker.batching import DynamicBatcher, Overloaded, ShuttingDown
from gpu_worker.batching import Request as BatchRequest
from gpu_worker.config import ConfigError, ServerConfig, ws_url
from gpu_worker.model import ModelLoadError, Policy, load_model
from gpu_worker.protocol import ParsedFrame, ProtocolError, build_reply, parse_frame
from gpu_worker import reload as reloading
from gpu_worker.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gpu_worker.metrics import ServerMetrics

logger = logging.getLogger("gpu_worker")

MODEL_PATH_PREFIX = "/models/"
ADMIN_PATH = "/admin"
INLINE_QUIET_S = 0.25  # a request runs inline only when none overlapped another for this long
STATUS_PATH = "/status"
RESERVED_OUTPUTS = frozenset({"server_timing", "model"})


@dataclasses.dataclass
class HostedModel:
    name: str
    target: str
    checkpoint: str | None
    policy: Policy
    batcher: DynamicBatcher
    version: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "class": self.target,
            "checkpoint": self.checkpoint,
            "version": self.version,
            "inputs": {k: s.describe() for k, s in self.policy.input_spec.items()},
            "outputs": {k: s.describe() for k, s in self.policy.output_spec.items()},
            "metadata": self.policy.metadata(),
        }


_INLINE = object()  # an inline request's deliver_to: answered on the spot, never delivered
MAX_PIPELINED = 16  # requests a connection may have in flight before the server stops reading from it


def _settle_answers(items: list) -> None:
    """A batch's answers, on the event loop: each request's ``deliver_to(result, error)``."""
    for request, result, error in items:
        try:
            request.deliver_to(result, error)
        except Exception:  # noqa: BLE001 - one answer's failure must not cost the rest of the batch theirs
            logger.error("delivering an answer failed", exc_info=True)


@dataclasses.dataclass(eq=False)
class _Reply:
    """One request's place in its connection's reply order: replies go out in the order requests came."""

    started: float
    payload: bytes | str | None = None  # a msgpack reply, or an error message (sent as a text frame)


@dataclasses.dataclass(eq=False)
class _Session:
    """A model connection's serving state, after its metadata frame."""

    ws: "_Connection"
    model: str  # the connection's model (from the URL path), unless a frame names another
    pending: collections.deque = dataclasses.field(default_factory=collections.deque)  # of _Reply, in order
    fragments: list | None = None  # a fragmented message being assembled
    fragments_text: bool = False
    prev_total_ms: float | None = None  # the last reply's time in the server, told in the next reply
    reading_paused: bool = False


class _Connection(ServerConnection):
    """A connection whose model requests are answered from the protocol's callback.

    websockets hands each message to a queue that a handler coroutine awaits, and each reply goes back
    through an awaited ``send``: task switches and futures per request, on the one core that also runs a
    small model's forward passes. Here a whole data message goes straight to :meth:`ModelServer._on_frame`
    from ``data_received``, and a reply is written to the transport as soon as it and every earlier reply
    of the connection are ready. The handshake, pings, closing and admin connections keep websockets' own
    handling."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.session: _Session | None = None
        self.early_frames: list | None = []  # data frames that came before the metadata frame went out
        self._direct: bool | None = None

    def process_event(self, event: Any) -> None:
        if type(event) is Frame and event.opcode in _DATA_OPCODES and self.request is not None:
            if self._direct is None:
                self._direct = self.request.path.split("?", 1)[0] != ADMIN_PATH
            if self._direct:
                if self.session is not None:
                    self.server_ref._on_frame(self.session, event)
                elif self.early_frames is not None:
                    self.early_frames.append(event)
                return
        super().process_event(event)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.session is not None:
            self.server_ref._pace(self.session)

    server_ref: "ModelServer"


_DATA_OPCODES = frozenset({Opcode.TEXT, Opcode.BINARY, Opcode.CONT})


_reload_jobs: "queue.SimpleQueue | None" = None


def _reload_worker() -> None:
    while True:
        fn, args, kwargs, settle = _reload_jobs.get()
        result, error = None, None
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            error = exc
        settle(result, error)


async def _on_daemon_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on the reload thread, awaited. One long-lived daemon thread: unlike the default
    executor's threads, the process does not wait for it at exit (a load from a path that hangs must not
    hold a shutdown), and unlike a thread per call it pays torch's per-thread start-up once."""
    global _reload_jobs
    if _reload_jobs is None:
        _reload_jobs = queue.SimpleQueue()
        threading.Thread(target=_reload_worker, name="model-reload", daemon=True).start()
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle_on_loop(result, error) -> None:
        if not done.done():
            done.set_exception(error) if error is not None else done.set_result(result)

    def settle(result, error) -> None:
        try:
            loop.call_soon_threadsafe(settle_on_loop, result, error)
        except RuntimeError:  # the loop is gone: the server stopped meanwhile
            pass

    _reload_jobs.put((fn, args, kwargs, settle))
    return await done


def resolve_device(requested: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch  # first touched here, inside the server process

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r} was asked for but no CUDA device is visible (CUDA_VISIBLE_DEVICES?)")
    return requested


class ModelServer:
    """Hosts the configured models behind one WebSocket port."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.models: dict[str, HostedModel] = {}
        self.device: str | None = None
        self.ready = False
        self.draining = False
        self.started_at = time.monotonic()
        self._server: Server | None = None
        self._inflight = 0
        self._idle = asyncio.Event()
        self._metadata: dict[str, bytes] = {}
        self._input_specs: dict[str, Any] = {}  # per hosted model, for parsing frames (set with the metadata)
        self._codec = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="codec")
        self._reloading: str | None = None  # the model being reloaded (one at a time per server)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._concurrent_at = float("-inf")  # when two connections last sent requests close together
        self._last_connection: object = None
        self._last_request_at = float("-inf")
        self.free_bytes = reloading.free_bytes  # memory a second copy may use on a device (a seam for tests)
        self.metrics = ServerMetrics(self)

    # -- lifecycle --------------------------------------------------------
    async def start(self) -> int:
        """Listen (answering 503 while loading), then load the models. Returns the port."""
        port = await self.listen()
        await self.load()
        return port

    async def listen(self) -> int:
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._process_request,
            max_size=self.config.max_message_bytes,
            compression=None,
            max_queue=4,
            create_connection=self._connection_class(),
        )
        port = self._server.sockets[0].getsockname()[1]
        self._loop = asyncio.get_running_loop()
        logger.info("listening on ws://%s:%d (loading models)", self.config.host, port)
        return port

    def _connection_class(self) -> type[_Connection]:
        return type("ModelServerConnection", (_Connection,), {"server_ref": self})

    async def load(self) -> None:
        """Load the models on a daemon thread, so a signal can end the process mid-load."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def settle(error: BaseException | None) -> None:
            if not done.done():
                done.set_exception(error) if error else done.set_result(None)

        def run() -> None:
            error = None
            try:
                self._load_models()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                error = exc
            try:
                loop.call_soon_threadsafe(settle, error)
            except RuntimeError:  # the loop is gone: the server stopped while loading
                pass

        threading.Thread(target=run, name="model-loader", daemon=True).start()
        await done
        self.ready = True
        logger.info("ready: models %s on %s", list(self.models), self.device)

    def _load_models(self) -> None:
        self.device = resolve_device(self.config.device)
        for spec in self.config.models:
            started = time.monotonic()
            policy = load_model(spec.target, spec.checkpoint, device=self.device, options=spec.options)
            clash = sorted(set(policy.output_spec) & RESERVED_OUTPUTS)
            if clash:
                raise ModelLoadError(f"model {spec.name!r} outputs {clash}, which replies reserve for the server")
            version = str(getattr(policy, "version", "init"))
            batcher = DynamicBatcher(
                policy.infer_batch,
                name=spec.name,
                max_batch_size=self.config.max_batch_size,
                max_wait_s=self.config.max_wait_ms / 1000,
                gap_s=self.config.batch_gap_ms / 1000,
                max_queue=self.config.max_queue,
                version=version,
                on_batch=self.metrics.observer(spec.name),
                deliver=self._deliver,
            )
            batcher.start()
            self.models[spec.name] = HostedModel(spec.name, spec.target, spec.checkpoint, policy, batcher, version,
                                                 dict(spec.options))
            logger.info("loaded model %r (%s) in %.2fs", spec.name, spec.target, time.monotonic() - started)
        self._refresh_metadata()

    def _refresh_metadata(self) -> None:
        self._metadata = {name: wire.packb(self.metadata(name)) for name in self.models}
        self._input_specs = {name: m.policy.input_spec for name, m in self.models.items()}

    async def reload(self, name: str, checkpoint: str, *, abandoned: Callable[[], bool] = lambda: False
                     ) -> dict[str, Any]:
        """Load ``checkpoint`` for hosted model ``name`` beside the copy serving, warm it up, and swap it in
        between two batches (the batch running finishes on the old weights). One reload at a time per server
        (two at once could each pass the memory check and together not fit). Raises
        :class:`~gpu_worker.reload.ReloadError` with the reason when refused; the old copy keeps serving.
        ``abandoned()`` is asked just before the swap: a caller that gave up does not get a swap it was told
        failed."""
        if not isinstance(name, str) or name not in self.models:
            raise reloading.ReloadError(f"unknown model {name!r:.80}; hosted: {sorted(self.models)}")
        if not isinstance(checkpoint, str) or not checkpoint or len(checkpoint) > 4096:
            raise reloading.ReloadError("checkpoint: must be a path on the model server (1-4096 characters)")
        if self._reloading:
            raise reloading.ReloadError(f"a reload of model {self._reloading!r} is running on this server; "
                                        "wait for it to finish")
        if self.draining:
            raise reloading.ReloadError("the server is shutting down")
        self._reloading = name
        try:
            hosted = self.models[name]
            started = time.monotonic()
            # Loading and warming up run on daemon threads: a shutdown never waits for a load that hangs.
            needed = max(reloading.model_bytes(hosted.policy),
                         await _on_daemon_thread(reloading.checkpoint_bytes, checkpoint))
            reloading.check_memory(name, needed, await _on_daemon_thread(self.free_bytes, self.device), self.device)
            try:
                policy = await _on_daemon_thread(load_model, hosted.target, checkpoint, device=self.device,
                                                 options=hosted.options)
            except Exception as exc:  # noqa: BLE001 - a bad checkpoint is refused with its reason
                raise reloading.load_error(name, checkpoint, exc) from exc
            loaded = time.monotonic()
            clash = sorted(set(policy.output_spec) & RESERVED_OUTPUTS)
            if clash:
                raise reloading.ReloadError(f"model {name!r} outputs {clash}, which replies reserve for the server")
            reloading.same_interface(name, hosted.policy, policy)
            reloading.check_metadata(name, policy)  # the new metadata frame must be sendable before the swap
            await _on_daemon_thread(reloading.warm_up, name, policy)
            warmed = time.monotonic()
            if self.draining:
                raise reloading.ReloadError("the server began shutting down during the reload; nothing swapped")
            if abandoned():
                raise reloading.ReloadError("the caller left before the swap; nothing swapped")
            version = str(getattr(policy, "version", "init"))
            previous, running = hosted.batcher.swap(policy.infer_batch, version)
            old = hosted.policy
            hosted.policy, hosted.version, hosted.checkpoint = policy, version, checkpoint
            self._refresh_metadata()  # connections opened from now on are told the new version
            swapped = time.monotonic()
            del old, policy
            # The old copy's memory goes back once the batch running at the swap is done with it.
            await _on_daemon_thread(self._release_old_copy, hosted.batcher, running)
            logger.info("model %r reloaded from %s: version %s (was %s); load %.2fs, warm-up %.2fs", name,
                        checkpoint, version, previous, loaded - started, warmed - loaded)
            return {"ok": True, "model": name, "checkpoint": checkpoint, "version": version,
                    "previous_version": previous, "load_s": round(loaded - started, 4),
                    "warmup_s": round(warmed - loaded, 4), "swap_s": round(swapped - warmed, 6)}
        finally:
            self._reloading = None

    def _release_old_copy(self, batcher: DynamicBatcher, running: object) -> None:
        """Once the batch running at the swap is done, the old copy's last reference is gone and reference
        counting frees it. On CUDA its memory then goes back to the device (a collection first, for any
        cycle that holds tensors; on the CPU that full collection would only pause serving, about 50 ms)."""
        batcher.wait_past(running, timeout=60.0)
        if self.device and self.device.startswith("cuda"):
            import torch

            gc.collect()
            torch.cuda.empty_cache()

    def admin_allowed(self) -> bool:
        """Admin calls need the API key; with none configured, only a server bound to loopback takes them."""
        if self.config.api_key:
            return True
        host = self.config.host.strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def metadata(self, model: str) -> dict[str, Any]:
        """The first frame of a connection whose model is ``model``."""
        hosted = self.models[model]
        reserved = {"server", "models", "default_model", "model"}
        own = {k: v for k, v in hosted.policy.metadata().items() if k not in reserved}
        return {
            **own,
            "server": {
                "name": "gpu_worker",
                "version": __version__,
                "device": self.device,
                "max_batch_size": self.config.max_batch_size,
                "max_wait_ms": self.config.max_wait_ms,
                "batch_gap_ms": self.config.batch_gap_ms,
                "max_queue": self.config.max_queue,
                "max_message_bytes": self.config.max_message_bytes,
                "explicit_batch": True,
            },
            "default_model": self.config.default_model,
            "model": model,
            "models": {name: m.describe() for name, m in self.models.items()},
        }

    async def drain_and_close(self, grace_s: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (up to the grace period), close."""
        grace_s = self.config.shutdown_grace_s if grace_s is None else grace_s
        self.draining = True
        if self._server is None:
            return
        self._server.close(close_connections=False)
        if self._inflight:
            logger.info("draining %d in-flight request(s), grace %.1fs", self._inflight, grace_s)
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), grace_s)
            except asyncio.TimeoutError:
                failed = sum(h.batcher.abandon("server shut down before this request ran") for h in self.models.values())
                logger.warning("grace period over: %d request(s) failed unanswered", failed)
        connections = list(self._server.connections)
        if connections:
            await asyncio.wait([asyncio.create_task(c.close(1001, "server shutting down")) for c in connections], timeout=5)
        try:
            await asyncio.wait_for(self._server.wait_closed(), 10)
        except asyncio.TimeoutError:
            logger.warning("connections did not close in time; exiting anyway")
        for hosted in self.models.values():
            await asyncio.to_thread(hosted.batcher.stop, 5.0)
        self._codec.shutdown(wait=False)
        logger.info("closed")

    # -- HTTP -------------------------------------------------------------
    def _authorized(self, request: Request) -> bool:
        """openpi-client sends ``Authorization: Api-Key <key>``; compared in constant time."""
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "api-key" and hmac.compare_digest(key.strip().encode(), self.config.api_key.encode())

    def _lone(self, connection: object) -> bool:
        """Whether this request has the server to itself: no other connection sent one in the last
        ``INLINE_QUIET_S`` and none is in flight. Then nothing could batch with it, and it may run inline on
        the event loop (for a short forward pass) instead of crossing to the batcher thread and back. A
        request from another connection turns that off for a while, so requests that arrive one by one under
        load (an inline run finishes before the loop reads the next) are never serialised inline."""
        now = time.monotonic()
        if connection is not self._last_connection:
            if now - self._last_request_at < INLINE_QUIET_S:
                self._concurrent_at = now
            self._last_connection = connection
        self._last_request_at = now
        return self._inflight == 1 and now - self._concurrent_at > INLINE_QUIET_S

    def _deliver(self, items: list) -> None:
        """A batch's answers, from its batcher thread: one wake-up of the event loop for all of them."""
        try:
            self._loop.call_soon_threadsafe(_settle_answers, items)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    @property
    def open_connections(self) -> int:
        return len(self._server.connections) if self._server is not None else 0

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/metrics" and (self.config.metrics_public or not self.config.api_key
                                   or self._authorized(request)):
            response = connection.respond(200, "")
            response.body = self.metrics.render()
            del response.headers["Content-Type"]
            del response.headers["Content-Length"]
            response.headers["Content-Type"] = METRICS_CONTENT_TYPE
            response.headers["Content-Length"] = str(len(response.body))
            return response
        if path == "/healthz":
            if self.ready and not self.draining:
                return connection.respond(200, "OK\n")
            return connection.respond(503, "shutting down\n" if self.draining else "loading models\n")
        if self.config.api_key and not self._authorized(request):
            return connection.respond(401, "unauthorized: send 'Authorization: Api-Key <key>'\n")
        if not self.ready:
            return connection.respond(503, "models are loading; retry when /healthz answers 200\n")
        if self.draining:
            return connection.respond(503, "server is shutting down\n")
        if self._server is not None and len(self._server.connections) >= self.config.max_connections:
            return connection.respond(503, f"too many connections (max_connections={self.config.max_connections})\n")
        if path == STATUS_PATH:  # the versions serving now, read by reward apps before trusting their cache
            body = json.dumps({"ready": True, **self._admin_status()}) + "\n"
            response = connection.respond(200, body)
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = "application/json"
            return response
        if path == ADMIN_PATH and not self.admin_allowed():
            return connection.respond(403, "admin calls need an api_key on a server not bound to loopback "
                                           "(start it with --api-key, or bind it to 127.0.0.1)\n")
        if path.startswith(MODEL_PATH_PREFIX) and path[len(MODEL_PATH_PREFIX) :] not in self.models:
            return connection.respond(404, f"unknown model in path {path!r}; hosted: {sorted(self.models)}\n")
        return None

    # -- WebSocket --------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        path = ws.request.path.split("?", 1)[0] if ws.request else "/"
        if path == ADMIN_PATH:
            return await self._handle_admin(ws)
        model = path[len(MODEL_PATH_PREFIX) :] if path.startswith(MODEL_PATH_PREFIX) else self.config.default_model
        logger.debug("connection from %s (model %s)", ws.remote_address, model)
        try:
            await ws.send(self._metadata[model])
        except websockets.ConnectionClosed:
            return
        session = _Session(ws, model)
        early, ws.early_frames = ws.early_frames or [], None
        ws.session = session  # from here on, requests are answered from the protocol callback
        for frame in early:
            self._on_frame(session, frame)
        await ws.wait_closed()

    # -- requests, answered from the protocol callback ---------------------
    def _on_frame(self, session: _Session, frame: Frame) -> None:
        """One data frame; a whole message (fragments joined) becomes a request."""
        if frame.opcode is Opcode.CONT:
            if session.fragments is None:  # the protocol refuses a continuation with nothing to continue
                return
            session.fragments.append(frame.data)
            if not frame.fin:
                return
            data, text = b"".join(session.fragments), session.fragments_text
            session.fragments = None
        elif not frame.fin:
            session.fragments, session.fragments_text = [frame.data], frame.opcode is Opcode.TEXT
            return
        else:
            data, text = frame.data, frame.opcode is Opcode.TEXT
        reply = _Reply(time.monotonic())
        session.pending.append(reply)
        self._inflight += 1
        try:
            if text:
                self.metrics.error("bad_request")
                self._ready(session, reply, "text frames are not accepted: send one msgpack-encoded observation "
                                            "per binary frame (openpi wire format)")
            elif self.draining:
                self.metrics.error("shutting_down")
                self._ready(session, reply, "server is shutting down; send this request to another server")
            elif len(data) >= self.config.codec_offload_bytes:  # large frames: decoded off the event loop
                decoding = self._loop.run_in_executor(self._codec, self._decode, data, session.model)
                decoding.add_done_callback(functools.partial(self._decoded, session, reply))
            else:
                try:
                    parsed = self._decode(data, session.model)
                except Exception as exc:  # noqa: BLE001 - told to the client
                    self._ready(session, reply, self._bad_frame(exc))
                else:
                    self._dispatch(session, reply, parsed)
        except Exception as exc:  # noqa: BLE001 - a request never costs the server its connection
            self._failed(session, reply, exc)
        self._pace(session)

    def _bad_frame(self, exc: BaseException) -> str:
        self.metrics.error("bad_request")
        if isinstance(exc, (ProtocolError, wire.WireError)):
            return f"bad request: {exc}"
        # anything else a hostile frame can provoke (RecursionError, MemoryError, ...)
        logger.warning("frame from a client could not be parsed: %s: %s", type(exc).__name__, exc)
        return f"bad request: {type(exc).__name__}: {exc}"

    def _failed(self, session: _Session, reply: _Reply, exc: BaseException) -> None:
        logger.error("request on connection %s failed", session.ws.remote_address, exc_info=exc)
        if reply.payload is None:
            self._ready(session, reply, f"internal server error: {type(exc).__name__}: {exc}")

    def _decoded(self, session: _Session, reply: _Reply, decoding: asyncio.Future) -> None:
        try:
            if decoding.cancelled():
                self._ready(session, reply, "server is shutting down; send this request to another server")
            elif decoding.exception() is not None:
                self._ready(session, reply, self._bad_frame(decoding.exception()))
            else:
                self._dispatch(session, reply, decoding.result(), inline=False)
        except Exception as exc:  # noqa: BLE001
            self._failed(session, reply, exc)

    def _dispatch(self, session: _Session, reply: _Reply, parsed: ParsedFrame, inline: bool = True) -> None:
        """Run a request inline when it may (see :meth:`_lone`), else queue it on its model's batcher. A
        frame large enough to be decoded off the loop is never run inline: its model is a large one (images),
        and its forward pass belongs on the batcher thread, where the loop keeps moving other bytes."""
        hosted = self.models[parsed.model]
        if inline and self._lone(session.ws):
            inline = hosted.batcher.run_inline(BatchRequest(parsed.inputs, parsed.rows, deliver_to=_INLINE))
            if inline is not None:
                return self._answered(session, reply, parsed, *inline)
        try:
            hosted.batcher.submit(BatchRequest(parsed.inputs, parsed.rows,
                                               deliver_to=functools.partial(self._answered, session, reply, parsed)))
        except Overloaded as exc:
            self.metrics.error("overloaded")
            self._ready(session, reply, str(exc))
        except ShuttingDown as exc:
            self.metrics.error("shutting_down")
            self._ready(session, reply, str(exc))

    def _answered(self, session: _Session, reply: _Reply, parsed: ParsedFrame, result: Any,
                  error: BaseException | None) -> None:
        """A request's result (or its model's error): encode the reply, then send what is ready."""
        try:
            if isinstance(error, ShuttingDown):
                self.metrics.error("shutting_down")
                return self._ready(session, reply, f"server is shutting down: {error}")
            if error is not None:
                self.metrics.error("model_error")
                return self._ready(session, reply, f"model {parsed.model!r} failed: {type(error).__name__}: {error}")
            self.metrics.answered(parsed.model, parsed.rows)
            timing = {
                "infer_ms": result.timing.infer_ms,
                "queue_ms": result.timing.queue_ms,
                "batch_size": result.timing.batch_size,
                "batch_requests": result.timing.batch_requests,
            }
            if session.prev_total_ms is not None:
                timing["prev_total_ms"] = session.prev_total_ms
            message = build_reply(
                result.outputs, timing, is_batch=parsed.is_batch, model=parsed.model, version=result.version
            )
            if sum(v.nbytes for v in result.outputs.values()) < self.config.codec_offload_bytes:
                return self._ready(session, reply, self._encode(parsed.model, message))
            encoding = self._loop.run_in_executor(self._codec, self._encode, parsed.model, message)
            encoding.add_done_callback(functools.partial(self._encoded, session, reply))
        except Exception as exc:  # noqa: BLE001
            self._failed(session, reply, exc)

    @staticmethod
    def _encode(model: str, message: Any) -> bytes | str:
        try:
            return wire.packb(message)
        except TypeError as exc:
            return f"model {model!r} returned a value that cannot be sent: {exc}"

    def _encoded(self, session: _Session, reply: _Reply, encoding: asyncio.Future) -> None:
        if encoding.cancelled():
            return self._ready(session, reply, "server is shutting down; send this request to another server")
        if encoding.exception() is not None:
            return self._failed(session, reply, encoding.exception())
        self._ready(session, reply, encoding.result())

    def _ready(self, session: _Session, reply: _Reply, payload: bytes | str) -> None:
        reply.payload = payload
        if session.pending and session.pending[0] is reply:
            self._flush(session)

    def _flush(self, session: _Session) -> None:
        """Write the replies that are ready, in request order, and nothing past the first one that is not."""
        ws, wrote = session.ws, False
        while session.pending and session.pending[0].payload is not None:
            reply = session.pending.popleft()
            self._inflight -= 1
            session.prev_total_ms = (time.monotonic() - reply.started) * 1000
            if ws.protocol.state is WsState.OPEN:  # else the client left: its answer goes nowhere
                try:
                    if isinstance(reply.payload, str):
                        ws.protocol.send_text(reply.payload.encode())
                    else:
                        ws.protocol.send_binary(reply.payload)
                    wrote = True
                except websockets.InvalidState:
                    pass
        if wrote:
            try:
                ws.send_data()
            except Exception:  # noqa: BLE001 - a broken transport: the connection's own close reports it
                logger.debug("writing to %s failed", ws.remote_address, exc_info=True)
        if self._inflight == 0:
            self._idle.set()
        self._pace(session)

    def _pace(self, session: _Session) -> None:
        """Stop reading a connection's requests while it has many unanswered or does not read its replies
        (the transport's write buffer is full); start again once that clears."""
        hold = len(session.pending) >= MAX_PIPELINED or session.ws.paused
        if hold != session.reading_paused:
            session.reading_paused = hold
            transport = session.ws.transport
            transport.pause_reading() if hold else transport.resume_reading()

    async def _handle_admin(self, ws: ServerConnection) -> None:
        """Admin calls: after a hello frame, one msgpack map in, one out: ``{"command": "reload", "model": name,
        "checkpoint": path}`` or ``{"command": "status"}``; answers ``{"ok": true, ...}`` or ``{"ok": false,
        "error": reason}``, and the connection stays open."""
        try:
            await ws.send(wire.packb({"admin": True, **self._admin_status()}))
            while True:
                frame = await ws.recv()
                try:
                    request = wire.unpackb(frame) if isinstance(frame, bytes) else None
                    if not isinstance(request, dict):
                        raise reloading.ReloadError("an admin frame is one msgpack map: {'command': ...}")
                    command = request.get("command")
                    if command == "status":
                        reply = {"ok": True, **self._admin_status()}
                    elif command == "reload":
                        reply = await self.reload(request.get("model"), request.get("checkpoint"),
                                                  abandoned=lambda: ws.state is not WsState.OPEN)
                    else:
                        raise reloading.ReloadError(f"unknown admin command {command!r:.80}; known: 'reload', 'status'")
                except (reloading.ReloadError, wire.WireError) as exc:
                    logger.warning("admin call refused: %s", exc)
                    reply = {"ok": False, "error": str(exc)}
                except Exception as exc:  # noqa: BLE001 - an admin call never costs the connection its answer
                    logger.error("admin call failed", exc_info=True)
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                await ws.send(wire.packb(reply))
        except websockets.ConnectionClosed:
            pass

    def _admin_status(self) -> dict[str, Any]:
        return {"server": "gpu_worker", "device": self.device,
                "models": {name: {"version": m.version, "checkpoint": m.checkpoint} for name, m in self.models.items()}}

    def _decode(self, frame: bytes, model: str) -> ParsedFrame:
        return parse_frame(
            wire.unpackb(frame), specs=self._input_specs, default_model=model, max_rows=self.config.max_queue
        )


async def serve_until_signalled(
    config: ServerConfig,
    *,
    on_ready: Callable[[int], None] | None = None,
    on_error: Callable[[str], None] | None = None,
) -> int:
    """Run a server until SIGTERM or SIGINT; then drain and return the exit code.

    ``on_ready(port)`` is called once the models are loaded; ``on_error(message)``
    if they cannot be.
    """
    server = ModelServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        port = await server.listen()
        loading = asyncio.create_task(server.load())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not loading.done():
            logger.info("signal received while loading models: exiting without serving")
            loading.cancel()
            await server.drain_and_close(0)
            return 0
        stopping.cancel()
        loading.result()
    except Exception as exc:
        logger.error("startup failed: %s", exc, exc_info=not isinstance(exc, (ConfigError, ModelLoadError)))
        if on_error is not None:
            on_error(f"{type(exc).__name__}: {exc}")
        await server.drain_and_close(0)
        return 1
    if on_ready is not None:
        on_ready(port)
    await stop.wait()
    logger.info("signal received: shutting down")
    await server.drain_and_close()
    return 0


class ServerThread:
    """A server on its own event loop in a background thread (tests, embedding).

    >>> with ServerThread(ServerConfig(port=0)) as handle:
    ...     url = handle.url
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.server = ModelServer(config)
        self.port: int | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gpu-worker-loop", daemon=True)

    @property
    def url(self) -> str:
        return ws_url(self.config.host, self.port)

    def start(self) -> "ServerThread":
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout=120)
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.drain_and_close(grace_s), self._loop).result(timeout=grace_s + 30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
