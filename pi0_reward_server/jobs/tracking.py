"""What a running task reports to its job: progress in units (episodes or games), and whether the job was
cancelled. A tracker travels into LIBERO worker processes (pickled as how to reopen its store: the SQLite
path or the Redis URL), so a task reports and stops the same way wherever it runs."""

from __future__ import annotations

import pathlib
import threading
import time
from typing import Any

_stores: dict[str, Any] = {}
_stores_lock = threading.Lock()
CANCEL_CHECK_S = 0.25  # how stale a task's view of its job's cancellation may be


class JobCancelled(RuntimeError):
    """The task's job was cancelled: no more inference is sent for it."""


def _open_store(spec: tuple):
    """The store a tracker names, opened once per process; None for a SQLite file this machine does not have
    (a Ray task on another node): such a task reports no progress and is stopped by ``ray.cancel`` instead
    of finding no job and taking itself for cancelled."""
    with _stores_lock:
        if spec not in _stores:
            if spec[0] == "sqlite" and not pathlib.Path(spec[1]).exists():
                return None
            if spec[0] == "redis":
                from pi0_reward_server.jobs.store_redis import RedisStore

                _stores[spec] = RedisStore(spec[1], prefix=spec[2])
            else:
                from pi0_reward_server.jobs.store_sqlite import SQLiteStore

                _stores[spec] = SQLiteStore(spec[1])
        return _stores[spec]


class TaskTracker:
    def __init__(self, store, job_id: str, idx: int, cancelled: threading.Event | None = None) -> None:
        self.store, self.job_id, self.idx = store, job_id, idx
        self._event = cancelled
        self._checked = 0.0
        self._cancelled = False

    def __getstate__(self) -> dict:
        reopen = getattr(self.store, "reopen_spec", None)
        return {"store": reopen() if reopen else None, "job_id": self.job_id, "idx": self.idx}

    def __setstate__(self, state: dict) -> None:
        self.__init__(_open_store(tuple(state["store"])) if state["store"] else None, state["job_id"], state["idx"])
        # A store on this machine that does not know the job (another app's file at the same path) is no
        # sign of cancellation either.
        if self.store is not None and self.store.state(self.job_id) is None:
            self.store = None

    def progress(self, units_done: int) -> None:
        if self.store is not None:
            self.store.progress(self.job_id, self.idx, units_done)

    def cancelled(self) -> bool:
        if self._cancelled or (self._event is not None and self._event.is_set()):
            return True
        now = time.monotonic()
        if self.store is not None and now - self._checked >= CANCEL_CHECK_S:
            self._checked = now
            # Cancelled, or marked failed by another process (its owner was thought gone): stop either way.
            self._cancelled = self.store.state(self.job_id) not in ("queued", "running")
        return self._cancelled


class CancellablePolicy:
    """Refuses the next policy call once the job is cancelled, so a cancelled task sends no more inference."""

    def __init__(self, policy, tracker: TaskTracker | None) -> None:
        self.policy = policy
        self.tracker = tracker

    def infer_batch(self, observations):
        if self.tracker is not None and self.tracker.cancelled():
            raise JobCancelled("the job was cancelled")
        return self.policy.infer_batch(observations)
