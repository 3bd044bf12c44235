"""Rollouts as Ray tasks (``execution = "ray"``): gym, LIBERO and self-play tasks run anywhere in a Ray cluster.

A task is a small remote function over plain data (the frozen task, the model server URLs, a deadline on
the wall clock, since monotonic clocks differ between nodes). Ray keeps worker processes for reuse, so
what a worker builds survives from task to task: its client pool to the model servers (brought up to
the app's membership on each call) and its last LIBERO environment (building one costs seconds).

The guarantees are those of the thread and process modes:

* exactly one result per task: a task that raises becomes a failure result inside the worker (as
  everywhere, so Ray never retries a task that ran to its end), while a worker that dies mid-task
  (killed, out of memory, its node lost) is retried by Ray up to ``max_retries`` times; only the
  result that comes back is recorded, so a retry never adds a second one;
* cancelling the job cancels its Ray work: queued tasks are never sent, running ones are cancelled
  with ``ray.cancel`` (and stop at their next policy call through the job store, like a LIBERO worker
  process), and each gets a ``JobCancelled`` result;
* the same seeds give the same scores: the task runs the same code through the same policy path.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

import ray

from pi0_reward_server.kinds.base import TaskResult

logger = logging.getLogger(__name__)
_worker_pool = None
_worker_lock = threading.Lock()
_rendering_checked = False
CANCEL_WAIT_S = 5.0  # how long cancelled tasks get to end by themselves before their workers are killed
DEADLINE_GRACE_S = 30.0  # beyond the deadline, for a task to notice it and answer
# Every Ray worker process keeps a pool to every model server: the pool connects on first use, not ahead,
# and checks a server in rotation this seldom (a dead one is still noticed at once, by the request that fails).
WORKER_HEALTH_INTERVAL_S = 30.0


def _pool_for(urls: list[str], pool_options: dict[str, Any]):
    """This worker process's client pool, holding exactly the app's current model servers."""
    global _worker_pool
    from pi0_reward_server.client_pool import ClientPool

    with _worker_lock:
        if _worker_pool is None:
            options = {**pool_options, "lazy_connections": True, "health_interval_s": max(
                pool_options.get("health_interval_s", 2.0), WORKER_HEALTH_INTERVAL_S)}
            _worker_pool = ClientPool(urls, report_gauges=False, allow_empty=True, **options).start()
        else:
            _worker_pool.set_servers(urls)
        pool = _worker_pool
    if pool.healthy_servers == 0:
        pool.wait_for_servers(1, pool_options.get("connect_timeout_s", 5.0))
    return pool


def run_remote(task, urls: list[str], pool_options: dict[str, Any], deadline_wall: float, budget_s: float,
               failure_score: float, tracker=None) -> TaskResult:
    """The body of a Ray task: one task through this worker's pool; its result, never an exception."""
    global _rendering_checked
    from pi0_reward_server.kinds.registry import run_task
    from pi0_reward_server.policies import DeadlinePolicy, PoolPolicy

    deadline = time.monotonic() + (deadline_wall - time.time())
    options: dict[str, Any] = {}
    kept_env = None
    try:
        if task.backend == "libero":
            from pi0_reward_server.jobs import processes
            from pi0_reward_server.kinds.libero import render_check

            if not _rendering_checked:
                render_check()
                _rendering_checked = True
            options["env_factory"] = processes._cached_make_env
            kept_env = processes._cached_env
        pool = _pool_for(urls, pool_options)
    except Exception as exc:  # noqa: BLE001 - this worker cannot run it (no rendering, a bad pool option)
        return TaskResult(score=failure_score, task=task.describe(),
                          error=f"{type(exc).__name__}: the Ray worker on node {ray.util.get_node_ip_address()} "
                                f"could not prepare the task: {exc}")
    result = run_task(task, lambda model: DeadlinePolicy(PoolPolicy(pool, model), deadline, budget_s),
                      failure_score, tracker=tracker, **options)
    if task.backend == "libero":  # whether this worker's environment from an earlier task served this one
        result.extra["env_reused"] = kept_env is not None and processes._cached_env is kept_env
    result.extra["ray_node"] = ray.get_runtime_context().get_node_id()
    result.extra["ray_worker_pid"] = os.getpid()
    return result


def ensure_ray(address: str | None, *, num_cpus: int | None = None) -> bool:
    """Connect to the Ray cluster at ``address`` ("auto": the one this node belongs to), or start a local one
    when ``address`` is empty. True when this call started Ray (so its owner shuts it down)."""
    if ray.is_initialized():
        return False
    try:
        if address:
            ray.init(address=address, namespace="pi0_reward_server", log_to_driver=False)
        else:
            ray.init(address="local", num_cpus=num_cpus, namespace="pi0_reward_server", log_to_driver=False,
                     include_dashboard=False)  # a new instance, not one RAY_ADDRESS names
    except ConnectionError as exc:
        raise RuntimeError(f"no Ray cluster at ray_address={address!r}: start one with 'ray start --head' "
                           f"(and 'ray start --address=<head>:6379' on the other nodes), or leave ray_address "
                           f"empty to start one in this process ({exc})") from exc
    return True


class RayRunner:
    """Runs a job's tasks as Ray tasks, results reported as they end. At most ``max(max_workers, the cluster's
    task slots)`` are submitted at once, so a cancelled job has little queued in Ray to take back."""

    def __init__(self, *, urls: Callable[[], list[str]], pool_options: dict[str, Any], failure_score: float,
                 address: str | None = None, task_cpus: float = 1.0, max_retries: int = 3,
                 num_cpus: int | None = None) -> None:
        self._urls = urls
        self._pool_options = dict(pool_options)
        self.failure_score = failure_score
        self._started_ray = ensure_ray(address, num_cpus=num_cpus)
        self._remote = ray.remote(run_remote).options(num_cpus=task_cpus, max_retries=max_retries,
                                                      retry_exceptions=False)
        self.task_cpus = task_cpus
        self._closed = threading.Event()

    def slots(self) -> int:
        """How many tasks the cluster runs at once (its CPUs over each task's share)."""
        return max(1, int(ray.cluster_resources().get("CPU", 1) // self.task_cpus))

    def _failure(self, task, error: str) -> TaskResult:
        return TaskResult(score=self.failure_score, error=error, task=task.describe())

    def run(self, tasks: list, max_workers: int, deadline: float, trackers: list | None,
            on_result: Callable[[int, TaskResult], None] | None) -> list[TaskResult]:
        """``deadline`` on time.monotonic(); ``trackers[i]`` follows task i; ``on_result(i, r)`` once per task."""
        results: list[TaskResult | None] = [None] * len(tasks)
        budget_s = max(0.0, deadline - time.monotonic())
        deadline_wall = time.time() + budget_s
        in_flight: dict[Any, int] = {}
        next_task = 0
        limit = max(max_workers, self.slots())  # Ray queues what the cluster cannot run yet; the rest waits here

        def finish(i: int, result: TaskResult) -> None:
            results[i] = result
            if on_result is not None:
                on_result(i, result)

        def cancelled() -> bool:
            return self._closed.is_set() or bool(trackers) and trackers[0].cancelled()

        try:
            while next_task < len(tasks) or in_flight:
                if cancelled() or time.monotonic() > deadline + DEADLINE_GRACE_S:
                    reason = ("JobCancelled: the job was cancelled" if cancelled() else
                              f"TimeoutError: the request's time limit ({budget_s:g}s, max_request_seconds) ran out")
                    self._stop(tasks, in_flight, finish, reason)
                    for i in range(next_task, len(tasks)):  # never sent
                        finish(i, self._failure(tasks[i], reason))
                    break
                while next_task < len(tasks) and len(in_flight) < limit:
                    tracker = trackers[next_task] if trackers is not None else None
                    # The servers as they stand now: a long job follows servers joining and leaving.
                    ref = self._remote.remote(tasks[next_task], self._urls(), self._pool_options, deadline_wall,
                                              budget_s, self.failure_score, tracker)
                    in_flight[ref] = next_task
                    next_task += 1
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.2)
                for ref in ready:
                    i = in_flight.pop(ref)
                    finish(i, self._collect(ref, tasks[i], "JobCancelled: the job was cancelled"))
        except BaseException:
            for ref in in_flight:  # the job is failing (its store, an interrupt): its Ray work must not run on
                ray.cancel(ref, force=False)
            raise
        return results  # type: ignore[return-value]

    def _collect(self, ref, task, cancelled_reason: str) -> TaskResult:
        try:
            return ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            return self._failure(task, cancelled_reason)
        except ray.exceptions.RayTaskError as exc:  # raised in the task itself (its worker lives on)
            cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
            return self._failure(task, f"{type(cause).__name__}: the task failed in its Ray worker: "
                                       f"{str(cause)[:300]}")
        except ray.exceptions.RayError as exc:  # its worker died more often than max_retries allows
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return self._failure(task, f"{type(exc).__name__}: the Ray worker running it was lost: {first_line[:300]}")

    def _stop(self, tasks: list, in_flight: dict, finish, reason: str) -> None:
        """Cancel what runs: first politely (a KeyboardInterrupt in the task; it also stops at its next policy
        call through the job store), then by killing the worker of a task that has not ended in time. A task
        that ended anyway keeps the result it produced."""
        if not in_flight:
            return
        for ref in in_flight:
            ray.cancel(ref, force=False)
        ready, stuck = ray.wait(list(in_flight), num_returns=len(in_flight), timeout=CANCEL_WAIT_S)
        for ref in stuck:
            ray.cancel(ref, force=True)
        for ref in ready:
            i = in_flight.pop(ref)
            finish(i, self._collect(ref, tasks[i], reason))
        for ref in stuck:
            i = in_flight.pop(ref)
            finish(i, self._failure(tasks[i], reason))

    def close(self) -> None:
        self._closed.set()
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
