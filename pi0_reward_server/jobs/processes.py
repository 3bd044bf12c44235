"""LIBERO tasks in spawned worker processes, each with its own client pool and a cached environment.

Rendering and physics hold the GIL for much of a step, so LIBERO tasks run in spawned worker processes
(measured in bench/bench_libero.py: 1.39x threads); each worker reaches the policy through its own client
pool over the app's model servers (brought up to its current membership on each task), and keeps its last environment for the next task of the same scene.
Progress and cancellation reach a worker through the job store (see :mod:`.tracking`).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from pi0_reward_server.kinds.libero import LiberoTask, make_env, render_check

_worker_pool = None
_cached_env: tuple[str, Any] | None = None


def _exit_with_parent(parent: int) -> None:
    """A worker whose app process died (SIGKILL included) must not live on holding ~2 GB."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _init_worker(urls: list[str], pool_options: dict[str, Any], parent: int) -> None:
    global _worker_pool
    from pi0_reward_server.client_pool import ClientPool

    _exit_with_parent(parent)
    render_check()
    _worker_pool = ClientPool(urls, report_gauges=False, allow_empty=True, **pool_options).start(
        wait_s=pool_options.get("connect_timeout_s", 5) if urls else None)


def _cached_make_env(bddl: str, seed: int, horizon: int):
    """One environment kept per worker process: building one costs seconds and ~1.6 GB."""
    global _cached_env
    key = f"{bddl}@{max(1000, horizon)}"
    if _cached_env is not None and _cached_env[0] == key:
        env = _cached_env[1]
        env.seed(seed)  # a hard reset rebuilds the scene from the seeded RNG: as good as a fresh env
        return env
    if _cached_env is not None:
        _cached_env[1].close()
        _cached_env = None
    env = make_env(bddl, seed, horizon)
    _cached_env = (key, env)
    return env


def _run_in_worker(task: LiberoTask, urls: list[str], deadline: float, budget_s: float, failure_score: float,
                   tracker=None):
    """``urls``: the app's model servers as they stand now (servers join and leave while workers live).
    ``deadline`` is on time.monotonic(), which Linux keeps system-wide, so it means the same here.
    ``tracker`` arrives pickled as the job store's path: progress and cancellation go through the store."""
    from pi0_reward_server.kinds.registry import run_task
    from pi0_reward_server.policies import DeadlinePolicy, PoolPolicy

    added, _ = _worker_pool.set_servers(urls)
    if added and _worker_pool.healthy_servers == 0:
        _worker_pool.wait_for_servers(1, _worker_pool.connect_timeout_s)
    return run_task(task, lambda model: DeadlinePolicy(PoolPolicy(_worker_pool, model), deadline, budget_s),
                    failure_score, tracker=tracker, env_factory=_cached_make_env)


class ProcessRunner:
    """Runs LIBERO tasks in ``processes`` spawned workers (never forked: the app may hold threads and sockets).

    A worker that dies (out of memory, a simulator crash) or outlives the request's deadline is
    replaced, so one bad episode never disables LIBERO for the process.
    """

    GRACE_S = 30.0  # beyond the deadline, for a worker to notice it and answer

    def __init__(self, urls: Callable[[], list[str]] | list[str], pool_options: dict[str, Any], processes: int) -> None:
        """``urls``: a callable giving the model servers as they stand now (the app passes its pool's, which
        follows membership), read at each task; or a fixed list."""
        import threading

        fixed = list(urls) if not callable(urls) else None
        self._urls: Callable[[], list[str]] = urls if fixed is None else (lambda: fixed)
        self._pool_options = dict(pool_options)
        self._processes = processes
        self._lock = threading.Lock()
        self._executor = self._new_executor()

    def _new_executor(self):
        import concurrent.futures
        import multiprocessing

        return concurrent.futures.ProcessPoolExecutor(
            max_workers=self._processes, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(list(self._urls()), self._pool_options, os.getpid()),
        )

    def _replace(self, broken) -> None:
        with self._lock:
            if self._executor is broken:
                for process in list(getattr(broken, "_processes", {}).values()):
                    process.kill()  # a hung worker will not stop by itself
                broken.shutdown(wait=False, cancel_futures=True)
                self._executor = self._new_executor()

    def run(self, task: LiberoTask, deadline: float, budget_s: float, failure_score: float, tracker=None):
        import concurrent.futures
        from concurrent.futures.process import BrokenProcessPool

        for attempt in range(2):
            executor = self._executor
            try:
                future = executor.submit(_run_in_worker, task, list(self._urls()), deadline, budget_s, failure_score,
                                         tracker)
                return future.result(timeout=max(0.0, deadline - time.monotonic()) + self.GRACE_S)
            except BrokenProcessPool:
                self._replace(executor)
                if attempt:
                    raise
            except concurrent.futures.TimeoutError:
                self._replace(executor)
                raise TimeoutError(f"LIBERO worker still busy past the request's time limit ({budget_s:g}s)") from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
