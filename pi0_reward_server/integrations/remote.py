"""The trainer side of the reward service: what every adapter uses to score samples.

Needs only the standard library (the adapters run inside trainer processes, beside their own torch).

* :class:`RewardService` talks HTTP to the reward app over kept-alive connections (one per thread), retries
  what can succeed later (a refused or reset connection, 429/502/503/504, honouring ``Retry-After``) within
  a bound, and runs every evaluation as a job (``POST /jobs`` with an ``Idempotency-Key``, then short
  ``GET /jobs/<id>`` polls), so no HTTP request is held open longer than a poll, however long the
  evaluation runs. A sample the service refuses (400 naming ``responses[i]``) fails alone; a request too
  big for the service is split; samples whose task failed are resubmitted (finished tasks come back from
  the service's cache).
* :class:`Batcher` gathers the samples that callers submit at about the same time (a short window, a size
  cap) into one job, and hands each caller a future of its own :class:`Outcome`. Trainers that call a
  reward function once per sample, many at once (verl, OpenRLHF's ``reward_func``), get batched requests.
* :class:`Options` holds an adapter's settings: keyword arguments over ``PI0_REWARD_*`` environment
  variables over defaults, each checked with an error that names it.

An outcome is a score or an error, never a stand-in number: each adapter turns errors into what its
trainer can see (an exception, a NaN, a None).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import http.client
import json
import logging
import math
import os
import re
import threading
import time
import urllib.parse
import uuid
from typing import Any, Mapping

logger = logging.getLogger("pi0_reward_server.integrations")

TERMINAL = ("done", "failed", "cancelled")
RETRY_STATUSES = (429, 502, 503, 504)


class RewardServiceError(RuntimeError):
    """The reward service could not score a sample (unreachable past the retries, refused it, or its task
    failed); the message says which and why."""


class RequestRejected(RewardServiceError):
    """The service refused a request for good (400, 401, 404, 413, 422): retrying it cannot help."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.field = status, field


# ---------------------------------------------------------------------------------------------------------
# Settings


def _number(name: str, value: Any, low: float, high: float, integer: bool = False) -> float:
    if isinstance(value, str):
        try:
            value = int(value) if integer else float(value)
        except ValueError:
            raise ValueError(f"{name}: must be {'an integer' if integer else 'a number'}, got {value!r:.80}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)) \
            or not math.isfinite(value) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name}: must be {kind} from {low:g} to {high:g}, got {value!r:.80}")
    return value


@dataclasses.dataclass(frozen=True)
class Options:
    """An adapter's settings. Each field can come from a keyword argument (verl's ``reward_kwargs``, a
    factory's arguments) or the environment variable named in :data:`ENV`."""

    url: str = "http://127.0.0.1:6006"  # the reward app (a path prefix is kept, for apps behind a proxy)
    token: str | None = None  # the app's token, sent as "Authorization: Bearer <token>"
    task: Any = None  # the task of samples whose own column names none: a reference or a spec
    reward_function_kwargs: Mapping[str, Any] | None = None  # defaults for every task (episodes, seed, ...)
    timeout_s: float = 3600.0  # a sample's whole evaluation, queueing and retries included
    batch_window_s: float = 0.05  # how long the first sample of a batch waits for company
    max_batch: int = 64  # samples per job
    max_parallel: int = 8  # jobs in flight at once from this process
    retries: int = 5  # extra attempts of an HTTP call that failed in a way that can pass
    task_retries: int = 1  # resubmissions of samples whose task failed on the service
    on_failure: str = "raise"  # "raise", or "nan"/"none" where the trainer accepts those
    request_timeout_s: float = 60.0  # one HTTP exchange

    ENV = {
        "url": "PI0_REWARD_URL", "token": "PI0_REWARD_TOKEN", "task": "PI0_REWARD_TASK",
        "reward_function_kwargs": "PI0_REWARD_KWARGS", "timeout_s": "PI0_REWARD_TIMEOUT_S",
        "batch_window_s": "PI0_REWARD_BATCH_WINDOW_S", "max_batch": "PI0_REWARD_MAX_BATCH",
        "max_parallel": "PI0_REWARD_MAX_PARALLEL", "retries": "PI0_REWARD_RETRIES",
        "task_retries": "PI0_REWARD_TASK_RETRIES", "on_failure": "PI0_REWARD_ON_FAILURE",
        "request_timeout_s": "PI0_REWARD_REQUEST_TIMEOUT_S",
    }

    @classmethod
    def resolve(cls, given: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None,
                failure_modes: tuple[str, ...] = ("raise",), **defaults: Any) -> Options:
        """Keyword arguments (``given``) over environment variables over ``defaults`` over the class's own.
        Raises ValueError naming the setting (and where it came from) when one is wrong."""
        environ = os.environ if environ is None else environ
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(given or {}) - fields)
        if unknown:
            raise ValueError(f"unknown reward setting(s) {unknown}; known: {sorted(fields)}")
        values: dict[str, Any] = dict(defaults)
        where: dict[str, str] = {name: "default" for name in values}
        for name, var in cls.ENV.items():
            if environ.get(var, "") != "":
                values[name], where[name] = environ[var], var
        for name, value in (given or {}).items():
            if value is not None:
                values[name], where[name] = value, name
        try:
            return cls._checked(values, failure_modes)
        except ValueError as exc:
            name = str(exc).split(":", 1)[0]
            source = where.get(name, name)
            raise ValueError(f"{exc} (from {source})" if source != name else str(exc)) from None

    @classmethod
    def _checked(cls, values: dict[str, Any], failure_modes: tuple[str, ...]) -> Options:
        out = dict(values)
        url = str(out.get("url", cls.url))
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url: must be the reward app's http(s)://host:port, got {url!r:.200}")
        out["url"] = url
        if isinstance(out.get("reward_function_kwargs"), str):
            try:
                out["reward_function_kwargs"] = json.loads(out["reward_function_kwargs"])
            except ValueError as exc:
                raise ValueError(f"reward_function_kwargs: not JSON: {exc}") from None
        for name in ("reward_function_kwargs", "task"):
            if out.get(name) is not None and not isinstance(out[name], str):
                try:
                    out[name] = plain(out[name])
                except TypeError as exc:
                    raise ValueError(f"{name}: {exc}") from None
        kwargs = out.get("reward_function_kwargs")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise ValueError(f"reward_function_kwargs: must be an object, got {type(kwargs).__name__}")
        task = out.get("task")
        if task is not None and not isinstance(task, (str, Mapping)):
            raise ValueError(f"task: must be a task reference or a spec object, got {type(task).__name__}")
        for name, low, high, integer in (("timeout_s", 0.1, 30 * 86400, False), ("batch_window_s", 0, 10, False),
                                         ("max_batch", 1, 100_000, True), ("max_parallel", 1, 1024, True),
                                         ("retries", 0, 100, True), ("task_retries", 0, 100, True),
                                         ("request_timeout_s", 0.1, 3600, False)):
            if name in out:
                out[name] = _number(name, out[name], low, high, integer)
        on_failure = str(out.get("on_failure", cls.on_failure)).lower()
        if on_failure not in failure_modes:
            raise ValueError(f"on_failure: must be one of {list(failure_modes)}, got {out.get('on_failure')!r:.80}")
        out["on_failure"] = on_failure
        if out.get("token") is not None and not isinstance(out["token"], str):
            raise ValueError("token: must be a string")
        return cls(**out)


# ---------------------------------------------------------------------------------------------------------
# HTTP and jobs


@dataclasses.dataclass
class Outcome:
    """One sample's result: ``score`` with the service's ``detail``, or an ``error``."""

    score: float | None = None
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None
    retriable: bool = False  # worth resubmitting (the task failed on the service, or the job did)

    @classmethod
    def failed(cls, error: str, *, retriable: bool = False, detail: dict | None = None) -> Outcome:
        return cls(error=error, retriable=retriable, detail=detail or {})

    @property
    def ok(self) -> bool:
        return self.error is None

    def logs(self) -> dict[str, float]:
        """Numbers for a trainer's logs, the same keys for every sample."""
        return {"failed": float(not self.ok), "cached": float(bool(self.detail.get("cached"))),
                "episodes": float(self.detail.get("episodes") or 0), "seconds": float(self.detail.get("seconds") or 0)}


class RewardService:
    """The reward app's job routes, over one kept-alive connection per calling thread."""

    def __init__(self, url: str, token: str | None = None, *, retries: int = 5, request_timeout_s: float = 60.0,
                 max_retry_wait_s: float = 30.0, poll_max_s: float = 2.0) -> None:
        parts = urllib.parse.urlsplit(url)
        self.url = url.rstrip("/")
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self.retries, self.request_timeout_s = retries, request_timeout_s
        self.max_retry_wait_s, self.poll_max_s = max_retry_wait_s, poll_max_s
        self._local = threading.local()
        self.requests = 0  # HTTP exchanges sent (for tests and logs)
        self.jobs_submitted = 0
        self.active: set[str] = set()  # jobs submitted and not yet seen to end
        self._active_lock = threading.Lock()

    # -- one exchange, with retries ------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.request_timeout_s)
            self._local.conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def _exchange(self, method: str, path: str, body: bytes | None, headers: dict) -> tuple[int, dict, Any]:
        conn = self._connection()
        try:
            conn.request(method, self._prefix + path, body=body, headers={**self._headers, **headers})
            response = conn.getresponse()
            raw = response.read()
        except BaseException:
            self._drop_connection()  # a half-used connection is never reused
            raise
        self.requests += 1
        if response.getheader("Connection", "").lower() == "close":
            self._drop_connection()
        try:
            payload = json.loads(raw) if raw else {}
        except ValueError:
            payload = {"error": raw[:200].decode(errors="replace")}
        return response.status, dict(response.getheaders()), payload

    def request(self, method: str, path: str, body: Any = None, *, headers: dict | None = None,
                deadline: float | None = None) -> tuple[int, Any]:
        """(status, JSON) of one call. A refused, reset or timed-out connection is retried up to ``retries``
        times (0.5 s, doubling); a 429/502/503/504 (the app busy, restarting, or with no model server up) is
        retried after its ``Retry-After`` for as long as ``deadline`` allows (without one: ``retries`` times).
        Then :class:`RewardServiceError`. Other statuses are returned as they are."""
        data = None if body is None else json.dumps(body).encode()
        wait, problem, failures, busy = 0.5, "", 0, 0
        while True:
            try:
                status, response_headers, payload = self._exchange(method, path, data, headers or {})
            except (OSError, http.client.HTTPException) as exc:
                problem = f"{type(exc).__name__}: {exc}"
                failures += 1
                pause, spent = wait, failures > self.retries
                wait = min(wait * 2, self.max_retry_wait_s)
            else:
                if status not in RETRY_STATUSES:
                    return status, payload
                message = payload.get("error") if isinstance(payload, dict) else None
                problem = f"HTTP {status}" + (f": {message}" if message else "")
                busy += 1
                pause, spent = _retry_after(response_headers, wait), deadline is None and busy > self.retries
            if spent:
                attempts = failures + busy
                raise RewardServiceError(f"{method} {self.url}{path}: {problem} (after {attempts} attempts)")
            pause = min(pause, self.max_retry_wait_s)
            if deadline is not None and time.monotonic() + pause > deadline:
                raise RewardServiceError(f"{method} {self.url}{path}: {problem}; the adapter's timeout_s leaves "
                                         "no time to retry")
            logger.info("reward service: %s %s: %s; retrying in %.1fs", method, path, problem, pause)
            time.sleep(pause)

    # -- jobs ----------------------------------------------------------------------------------------------

    def submit(self, body: dict, deadline: float | None = None) -> str:
        """POST /jobs; the job's id. The same Idempotency-Key on every attempt: a retried submit whose first
        answer was lost returns the same job, never a second one."""
        status, payload = self.request("POST", "/jobs", body, headers={"Idempotency-Key": uuid.uuid4().hex},
                                       deadline=deadline)
        if status == 202:
            self.jobs_submitted += 1
            with self._active_lock:
                self.active.add(payload["id"])
            return payload["id"]
        raise _rejected(status, payload, "POST /jobs")

    def job(self, job_id: str, deadline: float | None = None) -> dict:
        status, payload = self.request("GET", f"/jobs/{job_id}", deadline=deadline)
        if status != 200:
            raise _rejected(status, payload, f"GET /jobs/{job_id}")
        return payload

    def cancel(self, job_id: str) -> None:
        try:
            status, payload = self.request("DELETE", f"/jobs/{job_id}")
            if status != 200:
                logger.warning("reward service: could not cancel job %s: HTTP %s: %s", job_id, status,
                               payload.get("error") if isinstance(payload, dict) else payload)
        except RewardServiceError as exc:
            logger.warning("reward service: could not cancel job %s: %s", job_id, exc)
        finally:
            with self._active_lock:
                self.active.discard(job_id)

    def cancel_active(self) -> None:
        """Cancel every job this client submitted and is still waiting for (a trainer exiting)."""
        with self._active_lock:
            active = list(self.active)
        self.retries = 0
        for job_id in active:
            self.cancel(job_id)

    def wait(self, job_id: str, deadline: float) -> dict:
        """Poll the job until it ends (0.1 s, growing to ``poll_max_s`` between polls); its view. Past the
        deadline, or when it cannot be polled, the job is cancelled and :class:`RewardServiceError` raised:
        no job is left running for nobody."""
        pause, ended = 0.1, False
        try:
            while True:
                view = self.job(job_id, deadline)
                if view["state"] in TERMINAL and (view.get("result") is not None or view["state"] != "done"):
                    ended = True
                    return view
                if time.monotonic() + pause > deadline:
                    raise RewardServiceError(f"job {job_id} had not finished when the adapter's timeout_s ran "
                                             f"out ({view.get('progress', 0):.0%} done); it was cancelled")
                time.sleep(pause)
                pause = min(pause * 1.5, self.poll_max_s)
        finally:
            if ended:
                with self._active_lock:
                    self.active.discard(job_id)
            else:
                self.cancel(job_id)

    def score(self, specs: list, kwargs: Mapping[str, Any] | None = None, *, timeout_s: float = 3600.0,
              task_retries: int = 1, deadline: float | None = None) -> list[Outcome]:
        """One outcome per spec (a ``/score`` response), in order; never raises for a sample's failure.
        ``deadline`` (monotonic) overrides ``timeout_s``."""
        deadline = time.monotonic() + timeout_s if deadline is None else deadline
        outcomes: list[Outcome | None] = [None] * len(specs)
        pending = list(range(len(specs)))
        for attempt in range(task_retries + 1):
            got = self._score_once([specs[i] for i in pending], kwargs, deadline)
            again = []
            for i, outcome in zip(pending, got):
                outcomes[i] = outcome
                if not outcome.ok and outcome.retriable:
                    again.append(i)
            if not again or attempt == task_retries or time.monotonic() >= deadline:
                break
            logger.warning("reward service: %d of %d sample(s) failed (first: %s); resubmitting them",
                           len(again), len(pending), outcomes[again[0]].error)
            pending = again
        return outcomes  # type: ignore[return-value]

    def _score_once(self, specs: list, kwargs: Mapping[str, Any] | None, deadline: float) -> list[Outcome]:
        """Submit every part first (a part the service refuses fails alone; one too big is split), then wait
        for all of them: the parts run at once on the service."""
        outcomes: list[Outcome | None] = [None] * len(specs)
        jobs: list[tuple[list[int], str]] = []
        self._submit_parts(list(range(len(specs))), specs, kwargs, deadline, outcomes, jobs)
        for indices, job_id in jobs:
            for i, outcome in zip(indices, self._collect(job_id, len(indices), deadline)):
                outcomes[i] = outcome
        return outcomes  # type: ignore[return-value]

    def _submit_parts(self, indices: list[int], specs: list, kwargs: Mapping[str, Any] | None, deadline: float,
                      outcomes: list, jobs: list) -> None:
        if not indices:
            return
        body: dict[str, Any] = {"responses": [specs[i] for i in indices]}
        if kwargs:
            body["reward_function_kwargs"] = dict(kwargs)
        try:
            jobs.append((indices, self.submit(body, deadline)))
            return
        except RequestRejected as exc:
            match = re.match(r"responses\[(\d+)\](?:\.|$)", exc.field or "")
            if match and int(match.group(1)) < len(indices):  # a bad sample (and its copies) fail alone
                k = int(match.group(1))
                bad = specs[indices[k]]
                refused = Outcome.failed(f"the service refused this sample: "
                                         f"{str(exc).replace(f'responses[{k}]', 'task', 1)}")
                for i in indices:
                    if specs[i] == bad:
                        outcomes[i] = refused
                self._submit_parts([i for i in indices if specs[i] != bad], specs, kwargs, deadline, outcomes, jobs)
                return
            too_big = exc.status == 413 or (exc.status == 400 and exc.field == "responses")
            if too_big and len(indices) > 1:  # too much for one request: halves
                half = len(indices) // 2
                self._submit_parts(indices[:half], specs, kwargs, deadline, outcomes, jobs)
                self._submit_parts(indices[half:], specs, kwargs, deadline, outcomes, jobs)
                return
            failure = Outcome.failed(f"the service refused the request: {exc}")
        except RewardServiceError as exc:
            failure = Outcome.failed(str(exc))
        for i in indices:
            outcomes[i] = failure

    def _collect(self, job_id: str, n: int, deadline: float) -> list[Outcome]:
        try:
            view = self.wait(job_id, deadline)
        except RewardServiceError as exc:
            return [Outcome.failed(str(exc)) for _ in range(n)]
        if view["state"] == "cancelled":
            return [Outcome.failed(f"job {job_id} was cancelled on the service before it finished")
                    for _ in range(n)]
        result = view.get("result")
        if view["state"] == "failed" or not result:
            return [Outcome.failed(f"job {job_id} failed: {view.get('error')}", retriable=True) for _ in range(n)]
        outcomes = []
        for score, detail in zip(result["scores"], result["details"]):
            if detail.get("error"):
                outcomes.append(Outcome.failed(f"the task failed on the service: {detail['error']}",
                                               retriable=True, detail=detail))
            else:
                outcomes.append(Outcome(score=float(score), detail=detail))
        return outcomes


def _retry_after(headers: Mapping[str, str], default: float) -> float:
    value = {k.lower(): v for k, v in headers.items()}.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else default
    except ValueError:
        return default


def _rejected(status: int, payload: Any, what: str) -> RewardServiceError:
    payload = payload if isinstance(payload, dict) else {}
    message = payload.get("error") or f"HTTP {status}"
    if status >= 500:  # the service failed, not the request
        return RewardServiceError(f"{what}: the service failed: HTTP {status}: {message}")
    return RequestRejected(status, f"{what}: HTTP {status}: {message}", payload.get("field"))


# ---------------------------------------------------------------------------------------------------------
# Gathering concurrent callers


class Batcher:
    """Samples submitted within ``window_s`` of the first one waiting (or ``max_batch`` of them) go to the
    service as one job; up to ``max_parallel`` jobs run at once, and while all are busy the samples arriving
    wait together for the next. A sample's ``timeout_s`` counts from its submission. Thread-safe; async
    callers wrap the futures with :func:`asyncio.wrap_future`. Its threads are daemons: a trainer that exits
    does not wait for them (its jobs still waited for are cancelled on the service at exit)."""

    def __init__(self, service: RewardService, *, kwargs: Mapping[str, Any] | None = None, window_s: float = 0.05,
                 max_batch: int = 64, max_parallel: int = 8, timeout_s: float = 3600.0, task_retries: int = 1) -> None:
        self.service, self.kwargs = service, dict(kwargs or {})
        self.window_s, self.max_batch = window_s, max_batch
        self.timeout_s, self.task_retries = timeout_s, task_retries
        self._pending: list[tuple[Any, concurrent.futures.Future, float]] = []  # (spec, future, submitted at)
        self._cond = threading.Condition()
        self._slots = threading.BoundedSemaphore(max_parallel)
        self._thread = threading.Thread(target=self._dispatch, name="pi0-reward-batcher", daemon=True)
        self._thread.start()
        self.batches: list[int] = []  # sizes of the batches sent (for tests and logs)

    def submit(self, specs: list) -> list[concurrent.futures.Future]:
        futures = [concurrent.futures.Future() for _ in specs]
        now = time.monotonic()
        with self._cond:
            self._pending.extend((spec, future, now) for spec, future in zip(specs, futures))
            self._cond.notify()
        return futures

    def _dispatch(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
            self._slots.acquire()  # all jobs busy: the samples arriving meanwhile gather for the next
            with self._cond:
                while len(self._pending) < self.max_batch:
                    left = self._pending[0][2] + self.window_s - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            self.batches.append(len(batch))
            threading.Thread(target=self._run, args=(batch,), name="pi0-reward-job", daemon=True).start()

    def _run(self, batch: list[tuple[Any, concurrent.futures.Future, float]]) -> None:
        outcomes: list[Outcome] = []
        try:
            deadline = min(submitted for _, _, submitted in batch) + self.timeout_s
            outcomes = self.service.score([spec for spec, _, _ in batch], self.kwargs, deadline=deadline,
                                          task_retries=self.task_retries)
        except BaseException as exc:  # noqa: BLE001 - every caller gets an answer
            outcomes = [Outcome.failed(f"{type(exc).__name__}: {exc}") for _ in batch]
        finally:
            self._slots.release()
            for k, (_, future, _) in enumerate(batch):
                outcome = outcomes[k] if k < len(outcomes) else Outcome.failed("the batch ended without an answer")
                if future.set_running_or_notify_cancel():  # a caller that gave up (cancelled) is skipped
                    future.set_result(outcome)


_batchers: dict[tuple, Batcher] = {}
_batchers_lock = threading.Lock()


def _forget_batchers() -> None:
    """In a forked child the parent's threads are gone (and its lock may be held): start afresh."""
    global _batchers_lock
    _batchers_lock = threading.Lock()
    _batchers.clear()


os.register_at_fork(after_in_child=_forget_batchers)


def _cancel_at_exit() -> None:
    for batcher in list(_batchers.values()):
        batcher.service.cancel_active()


atexit.register(_cancel_at_exit)


def batcher_for(options: Options) -> Batcher:
    """The process's batcher for these settings: calls with the same settings share batches and connections."""
    key = (options.url, options.token, json.dumps(options.reward_function_kwargs, sort_keys=True),
           options.batch_window_s, options.max_batch, options.max_parallel, options.timeout_s, options.retries,
           options.task_retries, options.request_timeout_s)
    with _batchers_lock:
        batcher = _batchers.get(key)
        if batcher is None:
            service = RewardService(options.url, options.token, retries=options.retries,
                                    request_timeout_s=options.request_timeout_s)
            batcher = _batchers[key] = Batcher(
                service, kwargs=options.reward_function_kwargs, window_s=options.batch_window_s,
                max_batch=options.max_batch, max_parallel=options.max_parallel, timeout_s=options.timeout_s,
                task_retries=options.task_retries)
        return batcher


def plain(value: Any) -> Any:
    """JSON-ready data from what trainers hand over: OmegaConf containers (verl's Hydra settings), numpy
    arrays and scalars (verl's parquet columns), tuples. Raises TypeError naming what cannot be sent."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping) or (hasattr(value, "items") and hasattr(value, "keys")):
        return {str(k): plain(v) for k, v in value.items()}
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays and scalars
        return plain(value.tolist())
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and hasattr(value, "__len__")):
        return [plain(v) for v in value]
    raise TypeError(f"a {type(value).__name__} cannot be sent as JSON")
