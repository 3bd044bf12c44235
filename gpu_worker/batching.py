"""Dynamic batching: one thread owns a model and runs queued requests together.

Requests from every connection land in one bounded queue per model. The owner
thread takes the oldest request and, while fewer requests are queued than the
last batch had, waits for more: until that many are in, no request has
arrived for ``gap_s`` (when set), or ``max_wait_s`` has passed since the
oldest arrived (never longer than the model's recent forward pass, and not at
all when that is shorter than ``gap_s``). It then gathers the queued
requests whose inputs are compatible with it (same keys, per-row shapes and
dtypes) up to ``max_batch_size`` rows, stacks them, runs one forward pass and
answers each request's future with its own rows. Incompatible requests stay
queued, in order, for the next batch. An exception in the model is given to
every request of that batch; the thread keeps serving.

Deadlines use ``time.monotonic()``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import threading
import time
from typing import Any, Callable

import numpy as np

logger = logging.getLogger(__name__)

Signature = tuple[tuple[str, tuple[int, ...], str], ...]


class Overloaded(RuntimeError):
    """The queue is full; the client should back off and retry."""


class ShuttingDown(RuntimeError):
    """The batcher no longer accepts work."""


@dataclasses.dataclass(slots=True)
class BatchTiming:
    queue_ms: float
    infer_ms: float
    batch_size: int  # rows in the forward pass
    batch_requests: int  # requests that shared it


@dataclasses.dataclass(slots=True)
class BatchResult:
    outputs: dict[str, np.ndarray]  # leading axis = this request's rows
    timing: BatchTiming
    version: str = "init"  # the model version whose forward pass produced it


@dataclasses.dataclass(eq=False)
class Request:
    """``inputs`` maps each key to an array whose leading axis has ``rows`` rows.

    ``future`` is where a caller without a ``deliver`` callback waits; it is made only for such callers (a
    ``concurrent.futures.Future`` holds a condition variable: a few microseconds a request otherwise)."""

    inputs: dict[str, np.ndarray]
    rows: int
    future: concurrent.futures.Future | None = None
    deliver_to: Any = None  # with a batcher ``deliver`` callback: where the caller waits (opaque here)
    enqueued_at: float = 0.0

    def __post_init__(self) -> None:
        if self.future is None and self.deliver_to is None:
            self.future = concurrent.futures.Future()

    @functools.cached_property
    def signature(self) -> Signature:
        """What a batch's requests must share, worked out only for requests that queue (an inline run
        never needs it). Strings of different lengths stack fine, so their width is not part of it."""
        return tuple(
            sorted((k, v.shape[1:], "U" if v.dtype.kind == "U" else v.dtype.str) for k, v in self.inputs.items())
        )


def stack_inputs(requests: list[Request]) -> dict[str, np.ndarray]:
    if len(requests) == 1:
        return requests[0].inputs
    return {key: np.concatenate([r.inputs[key] for r in requests]) for key in requests[0].inputs}


def _check_outputs(outputs: Any, rows: int) -> dict[str, np.ndarray]:
    if not isinstance(outputs, dict):
        raise TypeError(f"model returned {type(outputs).__name__}, expected a dict of arrays")
    checked = {}
    for key, value in outputs.items():
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] != rows:
            raise ValueError(f"model output {key!r} has shape {value.shape}; its first axis must be the batch size {rows}")
        checked[key] = value
    return checked


def _settle(future: concurrent.futures.Future, *, result: Any = None, exception: BaseException | None = None) -> None:
    """Answer a future unless its caller gave up (cancelled) meanwhile."""
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


class DynamicBatcher:
    """Owns ``infer_batch`` (a model's batched forward) on one thread."""

    def __init__(
        self,
        infer_batch: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
        *,
        name: str = "model",
        max_batch_size: int = 64,
        max_wait_s: float = 0.001,
        gap_s: float = 0.0,
        max_queue: int = 1024,
        version: str = "init",
        on_batch: Callable[[int, float, list[float]], None] | None = None,
        deliver: Callable[[list[tuple["Request", Any, BaseException | None]]], None] | None = None,
    ) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if not isinstance(max_wait_s, (int, float)) or max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0 seconds, got {max_wait_s!r}")
        if not isinstance(gap_s, (int, float)) or gap_s < 0:
            raise ValueError(f"gap_s must be >= 0 seconds, got {gap_s!r}")
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be an integer >= 1, got {max_queue!r}")
        self._infer_batch = infer_batch
        self.version = version
        self._on_batch = on_batch  # metrics: (rows, inference seconds, each request's queue wait in seconds)
        # Answers a whole batch at once, [(request, result, exception)], instead of each request's future: an
        # event loop is then woken once per batch, not once per request.
        self._deliver = deliver
        self.infer_s_ema: float | None = None  # a moving average of forward-pass time (inline runs use it)
        self.inline_max_s = 0.002  # forward passes shorter than this may run inline for a lone caller
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_wait_s = float(max_wait_s)
        # A batch that waits stops waiting once no request has arrived for gap_s (0: wait out max_wait_s):
        # callers still coming back keep it open, a quiet queue does not hold its first request for long.
        self.gap_s = float(gap_s)
        self._last_arrival = 0.0
        self.max_queue = max_queue
        self._queue: collections.deque[Request] = collections.deque()
        self._queued_rows = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False
        self._current: list[Request] = []
        self._past_waiters = 0  # threads in wait_past: an inline run that ends must wake them
        # Requests in the last batch. Callers that wait for their answer before sending again (openpi's
        # clients, rollout workers) come back as many as they were: once that many are queued, waiting out
        # max_wait_s for more only adds latency. Fewer than last time wait as before, up to max_wait_s.
        self._last_batch_requests = max_batch_size
        self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        # Counters for metrics and status.
        self.batches = 0
        self.rows_served = 0
        self.errors = 0
        self.rejected = 0

    # -- public API -------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request) -> concurrent.futures.Future:
        """Queue ``request``; raises :class:`Overloaded` when the queue is full."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown(f"model {self.name!r} is shutting down")
            if self._queued_rows + request.rows > self.max_queue and self._queue:
                self.rejected += 1
                raise Overloaded(
                    f"overloaded: model {self.name!r} has {self._queued_rows} rows queued "
                    f"(max_queue={self.max_queue}); retry later"
                )
            request.enqueued_at = self._last_arrival = time.monotonic()
            self._queue.append(request)
            self._queued_rows += request.rows
            # Wake the batcher thread only when it has something to do: a first request to start a batch
            # for, or a batch that is now complete. Between those it sleeps until its max_wait_s deadline;
            # a wake-up per request would cost a thread switch (and the GIL's hand-over) each time.
            if (len(self._queue) == 1 or len(self._queue) >= self._last_batch_requests
                    or self._queued_rows >= self.max_batch_size):
                self._cond.notify()
        return request.future

    def swap(self, infer_batch: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
             version: str) -> tuple[str, object]:
        """Serve the next batches with ``infer_batch`` (a reloaded model); the batch running now finishes on
        the old one. Returns the version replaced and a token for :meth:`wait_past`."""
        with self._cond:
            previous, self._infer_batch, self.version = self.version, infer_batch, version
            running = self._current if self._busy else None
        logger.info("model %r: version %s replaces %s from the next batch on", self.name, version, previous)
        return previous, running

    def wait_past(self, running: object, timeout: float) -> bool:
        """Wait until the batch that was running at a :meth:`swap` (its token) has finished."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._past_waiters += 1
            try:
                while running is not None and self._busy and self._current is running:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(left)
            finally:
                self._past_waiters -= 1
        return True

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def queued_requests(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return self._busy

    def abandon(self, reason: str) -> int:
        """Stop taking work and fail every queued and running request with ``reason``.

        For a shutdown whose grace period is over: a model that hangs must not
        keep its callers (or the process) waiting. Returns how many were failed.
        """
        with self._cond:
            self._stopping = True
            pending = list(self._queue) + list(self._current)
            self._queue.clear()
            self._queued_rows = 0
            self._cond.notify_all()
        self._answer([(request, None, ShuttingDown(reason)) for request in pending])
        return len(pending)

    def _answer(self, items: list[tuple[Request, Any, BaseException | None]]) -> None:
        if self._deliver is not None:
            self._deliver(items)
            return
        for request, result, error in items:
            if request.future is not None:
                _settle(request.future, result=result, exception=error)

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the owner thread -------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while (not self._queue or self._busy) and not self._stopping:
                    self._cond.wait()  # busy here: a request running inline on its caller's thread
                if not self._queue:
                    return
                # Waiting for a caller longer than a forward pass takes costs more than running without it
                # (it would be answered one forward later), and a model whose forward is shorter than the gap
                # gains less from a fuller batch than the wait costs its callers: it does not wait at all.
                ema = self.infer_s_ema
                wait_s = self.max_wait_s if ema is None else (0.0 if ema < self.gap_s else min(self.max_wait_s, ema))
                deadline = self._queue[0].enqueued_at + wait_s
                while self._queued_rows < self.max_batch_size and not self._stopping:
                    if len(self._queue) >= self._last_batch_requests:
                        break  # as many callers as last time are in: with lock-step callers, that is all of them
                    now = time.monotonic()
                    if now >= deadline:
                        break
                    if self.gap_s:
                        quiet_at = self._last_arrival + self.gap_s
                        if now >= quiet_at:
                            break  # arrivals have stopped
                        self._cond.wait(min(deadline, quiet_at) - now)
                    else:
                        self._cond.wait(deadline - now)
                while self._busy and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    continue
                batch = self._take_batch()
                self._last_batch_requests = len(batch)
                self._busy = True
                self._current = batch
                infer, version = self._infer_batch, self.version  # a swap now waits for the next batch
            try:
                self._execute(batch, infer, version)
            finally:
                infer = batch = None  # no reference to a replaced model outlives its last batch
                with self._cond:
                    self._busy = False
                    self._current = []
                    self._cond.notify_all()  # wait_past, and a stop waiting for the queue

    def _take_batch(self) -> list[Request]:
        """Oldest request plus compatible ones, FIFO, up to max_batch_size rows."""
        first = self._queue.popleft()
        batch, rows, kept = [first], first.rows, collections.deque()
        while self._queue and rows < self.max_batch_size:
            request = self._queue.popleft()
            if request.signature == first.signature and rows + request.rows <= self.max_batch_size:
                batch.append(request)
                rows += request.rows
            else:
                kept.append(request)
        kept.extend(self._queue)
        self._queue = kept
        self._queued_rows -= rows
        return batch

    def _forward(self, infer: Callable, inputs: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        if rows <= self.max_batch_size:
            return _check_outputs(infer(inputs), rows)
        # One explicit batch larger than the limit: run it in max-size chunks.
        parts = []
        for start in range(0, rows, self.max_batch_size):
            chunk = {k: v[start : start + self.max_batch_size] for k, v in inputs.items()}
            parts.append(_check_outputs(infer(chunk), len(next(iter(chunk.values())))))
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    def run_inline(self, request: Request) -> tuple[Any, BaseException | None] | None:
        """Run ``request`` now on the calling thread, when the model is idle with nothing queued and its
        forward passes are short (under ``inline_max_s``): a lone caller then skips two thread hand-offs.
        Returns ``(result, error)``, or None when it must queue as usual."""
        ema = self.infer_s_ema
        if ema is None or ema > self.inline_max_s or request.rows > self.max_batch_size:
            return None
        with self._cond:
            if self._busy or self._queue or self._stopping:
                return None
            self._busy = True
            self._current = [request]
            request.enqueued_at = time.monotonic()
            infer, version = self._infer_batch, self.version
        answers: list = []
        try:
            self._execute([request], infer, version, answers.extend)
        finally:
            infer = None
            with self._cond:
                self._busy = False
                self._current = []
                # Wake the batcher thread only when it has work (requests that queued meanwhile) or a stop
                # to see, and wait_past's callers: a wake-up per inline request would cost a thread switch.
                if self._queue or self._stopping or self._past_waiters:
                    self._cond.notify_all()
        return (answers[0][1], answers[0][2]) if answers else None

    def _execute(self, batch: list[Request], infer: Callable, version: str,
                 answer: Callable[[list], None] | None = None) -> None:
        answer = answer or self._answer
        started = time.monotonic()
        rows = sum(r.rows for r in batch)
        try:
            outputs = self._forward(infer, stack_inputs(batch), rows)
        except BaseException as exc:  # every request of the batch hears of it
            self.errors += 1
            logger.error("model %r failed on a batch of %d rows", self.name, rows, exc_info=True)
            answer([(request, None, exc) for request in batch])
            return
        elapsed = time.monotonic() - started
        self.infer_s_ema = elapsed if self.infer_s_ema is None else 0.8 * self.infer_s_ema + 0.2 * elapsed
        infer_ms = elapsed * 1000
        self.batches += 1
        self.rows_served += rows
        if self._on_batch is not None:
            try:
                self._on_batch(rows, infer_ms / 1000, [started - r.enqueued_at for r in batch])
            except Exception:  # noqa: BLE001 - metrics never fail a batch
                logger.warning("batch metrics failed", exc_info=True)
        if len(batch) == 1:  # the common case at low load: its outputs are the batch's, unsliced
            timing = BatchTiming(queue_ms=(started - batch[0].enqueued_at) * 1000, infer_ms=infer_ms,
                                 batch_size=rows, batch_requests=1)
            answer([(batch[0], BatchResult(outputs, timing, version), None)])
            return
        offset, answers = 0, []
        for request in batch:
            timing = BatchTiming(
                queue_ms=(started - request.enqueued_at) * 1000,
                infer_ms=infer_ms,
                batch_size=rows,
                batch_requests=len(batch),
            )
            part = {k: v[offset : offset + request.rows] for k, v in outputs.items()}
            offset += request.rows
            answers.append((request, BatchResult(part, timing, version), None))
        answer(answers)
