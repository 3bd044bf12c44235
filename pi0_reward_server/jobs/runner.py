"""The one path work runs by: ``POST /jobs`` submits and returns, ``POST /score`` submits and waits.

A job's tasks fan out over a thread pool as before; each reports progress in
units (episodes or games) to the store and stops at its next policy call once
the job is cancelled. A task whose outcome is fixed by its spec (every task
here is seeded) is answered from the result cache when the same canonical
spec ran before on the same hosted model version(s), unless the request says
``"cache": false``.

Jobs belong to the process that runs them: it beats a heartbeat into the
store. A job whose heartbeat stops (the app was killed or restarted) is
marked ``failed`` with the reason after ``job_stale_s``; its finished tasks
keep their results. Jobs are not resumed: a half-run task cannot be resumed
mid-episode, and resubmitting (with caching) re-runs only what did not finish.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import queue
import threading
import time
import uuid
from typing import Callable

from pi0_reward_server import metrics
from pi0_reward_server.jobs.store_sqlite import TERMINAL
from pi0_reward_server.jobs.tracking import TaskTracker
from pi0_reward_server.kinds.registry import models_of, units_of

logger = logging.getLogger(__name__)
HEARTBEAT_S = 2.0


CACHE_VERSION = 1  # bump when a change to the kinds alters outcomes for the same spec (settle steps, encodings)


@dataclasses.dataclass(eq=False)
class _Job:
    """What this process holds for a job it runs: how to stop it, and how to say it ended (once)."""

    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    on_end: Callable[[], None] | None = None
    started: bool = False
    ended: bool = False


class JobRunner:
    def __init__(self, store, *, run_tasks: Callable[..., list], model_version: Callable[[str | None], str | None],
                 failure_score: float, max_concurrent_jobs: int = 8, job_stale_s: float = 60.0,
                 retention_s: float = 7 * 86400.0, refresh_versions: Callable[[], None] | None = None) -> None:
        self.store = store
        self._run_tasks = run_tasks  # (tasks, max_workers, deadline, trackers, on_result) -> results
        self._model_version = model_version
        self._refresh_versions = refresh_versions
        self.failure_score = failure_score
        self.job_stale_s = job_stale_s
        self.retention_s = retention_s
        self.owner = f"{os.uname().nodename}:{os.getpid()}"
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = threading.Event()
        # Daemon threads, not a ThreadPoolExecutor: at exit Python joins an executor's threads before atexit
        # handlers run, so a worker would hang until every job ended. Jobs cut short are marked by close().
        for i in range(max_concurrent_jobs):
            threading.Thread(target=self._work, name=f"job-{i}", daemon=True).start()
        self._janitor = threading.Thread(target=self._maintain, name="job-heartbeat", daemon=True)
        self._janitor.start()

    # -- submit, wait, cancel ---------------------------------------------------
    def submit(self, request: dict, tasks: list, *, max_workers: int, deadline: float, use_cache: bool = True,
               idempotency_key: str | None = None, on_end: Callable[[], None] | None = None,
               immediate: bool = False) -> tuple[str, bool]:
        """(job id, created): with an Idempotency-Key already used, the existing job and False.

        ``deadline`` is on time.monotonic(). ``immediate``: run on a thread of its own now (``/score``,
        whose caller is waiting) rather than in the queue of at most ``max_concurrent_jobs``."""
        job_id = uuid.uuid4().hex
        specs = [task.describe() for task in tasks]
        job_id, created = self.store.create_job(job_id, request, specs, [units_of(t) for t in tasks],
                                                idempotency_key=idempotency_key)
        if not created:
            if on_end is not None:
                on_end()
            return job_id, False
        job = _Job(on_end=on_end)
        with self._lock:
            self._jobs[job_id] = job
        work = (job_id, tasks, max_workers, deadline, use_cache)
        if self._closed.is_set():
            self.store.finish_job(job_id, "failed", error="the app is shutting down")
            self._end(job_id)
        elif immediate:
            threading.Thread(target=self._run, args=work, name="score-job", daemon=True).start()
        else:
            self._queue.put(work)
        return job_id, True

    def wait(self, job_id: str, timeout_s: float) -> dict | None:
        """The job once it has ended (or as it is when ``timeout_s`` runs out)."""
        with self._lock:
            job = self._jobs.get(job_id)
        deadline = time.monotonic() + timeout_s
        if job is not None:
            job.done.wait(timeout_s)
        else:  # run by another process: follow the store
            while self.store.state(job_id) not in (*TERMINAL, None) and time.monotonic() < deadline:
                time.sleep(0.2)
        return self.store.get(job_id)

    def cancel(self, job_id: str) -> str | None:
        state = self.store.cancel(job_id)
        with self._lock:
            job = self._jobs.get(job_id)
        if job is not None:
            job.cancel.set()  # this process runs it: stop at once; other processes see it in the store
            if not job.started:
                self._end(job_id)  # still queued: it frees its admission and waiters now, not when dequeued
        return state

    def close(self) -> None:
        """Stop: jobs this process was running or holding are marked failed with the reason (not cancelled:
        nobody asked), so a client sees why at once instead of after ``job_stale_s``."""
        self._closed.set()
        with self._lock:
            jobs = dict(self._jobs)
        for job_id, job in jobs.items():
            try:
                self.store.finish_job(job_id, "failed", error="the app process shut down before this job finished; "
                                                              "finished tasks keep their results; resubmit for the rest")
            except Exception:  # noqa: BLE001 - the store may be what failed; the stale sweep marks it later
                logger.error("could not mark job %s failed at shutdown", job_id, exc_info=True)
            metrics.jobs_ended.labels("failed").inc()
            job.cancel.set()
            self._end(job_id)

    def _end(self, job_id: str) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.ended:
                return
            job.ended = True
            self._jobs.pop(job_id, None)
        job.done.set()
        if job.on_end is not None:
            job.on_end()

    # -- running --------------------------------------------------------------
    def cache_versions(self, task) -> list[str] | None:
        """The ``name@version`` of each model that fixes the task's outcome, or None: not cacheable."""
        versions = []
        for model in models_of(task):
            version = self._model_version(model)
            if version is None or version.endswith("@init"):
                return None  # no version reported, servers disagree, or weights not tied to a checkpoint
            versions.append(version)
        return versions

    def cache_key(self, task, versions: list[str] | None = None) -> str | None:
        versions = self.cache_versions(task) if versions is None else versions
        if versions is None:
            return None
        canonical = json.dumps({"task": task.describe(), "models": versions, "cache_version": CACHE_VERSION},
                               sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def _work(self) -> None:
        while not self._closed.is_set():
            self._run(*self._queue.get())

    def _run(self, job_id: str, tasks: list, max_workers: int, deadline: float, use_cache: bool) -> None:
        started = time.monotonic()
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None:
                job.started = True
        if job is None or job.ended:
            return  # cancelled (or shut down) while queued
        cancel = job.cancel
        try:
            if not self.store.start_job(job_id, self.owner):
                return  # cancelled while queued, by another process
            details: list[dict | None] = [None] * len(tasks)
            if use_cache and self._refresh_versions is not None:
                self._refresh_versions()  # read now: a reload a moment ago through another process counts
            versions = [self.cache_versions(task) if use_cache else None for task in tasks]
            keys = [self.cache_key(task, v) if v is not None else None for task, v in zip(tasks, versions)]
            pending = []
            for i, key in enumerate(keys):
                hit = self.store.cached(key) if key else None
                if hit is not None:
                    details[i] = {**hit, "cached": True}
                    self.store.finish_task(job_id, i, hit["score"], details[i], cached=True)
                    metrics.task_ended(tasks[i].backend, details[i])
                else:
                    pending.append(i)

            def record(k: int, result) -> None:
                i = pending[k]
                details[i] = {**result.to_dict(), "cached": False}
                self.store.finish_task(job_id, i, result.score, details[i])
                metrics.task_ended(tasks[i].backend, details[i])
                # Cache only a clean result, and only if the model versions are still those it started with
                # and those its replies named (a server restarted or reloaded with other weights mid-job must
                # not file its results under the old key).
                produced = details[i].get("model_versions")
                if (keys[i] is not None and result.error is None and not details[i].get("episode_errors")
                        and not cancel.is_set() and self.cache_key(tasks[i]) == keys[i]
                        and (produced is None or set(produced) == set(versions[i]))):
                    self.store.remember(keys[i], details[i])

            if pending:
                trackers = [TaskTracker(self.store, job_id, i, cancel) for i in pending]
                self._run_tasks([tasks[i] for i in pending], max_workers, deadline, trackers, record)
            result = {
                "job_id": job_id,
                "scores": [d["score"] for d in details],
                "details": details,
                "failures": sum(d.get("error") is not None for d in details),
                "cached": sum(bool(d.get("cached")) for d in details),
                "max_workers": max_workers,
                "seconds": time.monotonic() - started,
            }
            self.store.finish_job(job_id, "cancelled" if cancel.is_set() else "done", result)
            metrics.jobs_ended.labels("cancelled" if cancel.is_set() else "done").inc()
        except Exception as exc:  # noqa: BLE001 - the job must end, with the reason
            logger.error("job %s failed", job_id, exc_info=True)
            metrics.jobs_ended.labels("failed").inc()
            try:
                self.store.finish_job(job_id, "failed", error=f"{type(exc).__name__}: {exc}")
            except Exception:  # noqa: BLE001 - the store itself is failing; the heartbeat sweep will mark it
                logger.error("could not record the failure of job %s", job_id, exc_info=True)
        finally:
            self._end(job_id)

    def _maintain(self) -> None:
        last_sweep = 0.0
        while not self._closed.wait(HEARTBEAT_S):
            try:
                with self._lock:
                    running = list(self._jobs)
                self.store.heartbeat(running)
                if time.monotonic() - last_sweep >= min(30.0, self.job_stale_s / 2):
                    last_sweep = time.monotonic()
                    for job_id in self.store.fail_stale(self.job_stale_s):
                        logger.warning("job %s lost its process; marked failed", job_id)
                    self.store.expire(self.retention_s)
            except Exception:  # noqa: BLE001 - keep beating; a store error is logged and retried
                logger.error("job heartbeat failed", exc_info=True)
