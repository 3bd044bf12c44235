"""The job store's interface kept in this process's memory: for one-process development and as the
benchmark's baseline. Nothing survives a restart and other processes (gunicorn workers, LIBERO worker
processes) cannot see it, so production uses SQLite (or Redis)."""

from __future__ import annotations

import copy
import threading
import time

from pi0_reward_server.jobs.store_sqlite import TERMINAL


class MemoryStore:
    path = None  # trackers pickled into worker processes carry no store

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, dict] = {}
        self._keys: dict[str, str] = {}
        self._cache: dict[str, tuple[float, dict]] = {}
        self._members: dict[str, dict] = {}

    def create_job(self, job_id, request, specs, units, *, idempotency_key=None):
        with self._lock:
            if idempotency_key is not None and idempotency_key in self._keys:
                return self._keys[idempotency_key], False
            self._jobs[job_id] = {
                "id": job_id, "state": "queued", "created": time.time(), "started": None, "finished": None,
                "heartbeat": None, "owner": None, "idempotency_key": idempotency_key, "request": request,
                "total": len(specs), "error": None, "result": None,
                "tasks": [{"idx": i, "spec": spec, "state": "queued", "score": None, "result": None, "units_done": 0,
                           "units_total": u, "cached": 0} for i, (spec, u) in enumerate(zip(specs, units))],
            }
            if idempotency_key is not None:
                self._keys[idempotency_key] = job_id
        return job_id, True

    def find_idempotent(self, key):
        with self._lock:
            job_id = self._keys.get(key)
            job = self._jobs.get(job_id) if job_id else None
            return (job_id, copy.deepcopy(job["request"])) if job else None

    def start_job(self, job_id, owner):
        with self._lock:
            job = self._jobs[job_id]
            if job["state"] != "queued":
                return False
            job.update(state="running", started=time.time(), heartbeat=time.time(), owner=owner)
            return True

    def heartbeat(self, job_ids):
        with self._lock:
            for job_id in job_ids:
                if job_id in self._jobs:
                    self._jobs[job_id]["heartbeat"] = time.time()

    def progress(self, job_id, idx, units_done):
        with self._lock:
            task = self._jobs[job_id]["tasks"][idx]
            task["units_done"] = units_done
            if task["state"] == "queued":
                task["state"] = "running"

    def finish_task(self, job_id, idx, score, result, *, cached=False):
        with self._lock:
            task = self._jobs[job_id]["tasks"][idx]
            if task["state"] != "cancelled":
                task["state"] = "failed" if result.get("error") else "done"
            task.update(score=score, result=result, cached=int(cached), units_done=task["units_total"])

    def finish_job(self, job_id, state, result=None, error=None):
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job["result"] is not None or job["state"] in ("done", "failed"):
                return
            if job["state"] != "cancelled":
                job["state"] = state
            job["finished"] = job["finished"] or time.time()
            job["result"] = result
            job["error"] = job["error"] or error

    def cancel(self, job_id):
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job["state"] in TERMINAL:
                return job["state"]
            job.update(state="cancelled", finished=time.time(), error="cancelled by request")
            for task in job["tasks"]:
                if task["state"] in ("queued", "running"):
                    task["state"] = "cancelled"
            return "cancelled"

    def state(self, job_id):
        with self._lock:
            job = self._jobs.get(job_id)
            return None if job is None else job["state"]

    def get(self, job_id, *, with_tasks=True):
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            job = copy.deepcopy(job)
        if not with_tasks:
            job.pop("tasks")
        return job

    def list(self, *, limit, offset):
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: j["created"], reverse=True)
            page = [{k: j[k] for k in ("id", "state", "created", "started", "finished", "total", "error")}
                    | {"done": sum(t["state"] in ("done", "failed") for t in j["tasks"])}
                    for j in jobs[offset:offset + limit]]
            return page, len(jobs)

    def list_active(self, limit=10):
        with self._lock:
            jobs = sorted((j for j in self._jobs.values() if j["state"] in ("queued", "running")),
                          key=lambda j: j["created"], reverse=True)[:limit]
            return [{k: j[k] for k in ("id", "state", "created", "started", "finished", "total", "error")}
                    | {"done": sum(t["state"] in ("done", "failed") for t in j["tasks"])} for j in jobs]

    def fail_stale(self, older_than_s):
        return []  # the jobs of this process die with it

    def expire(self, older_than_s):
        cutoff = time.time() - older_than_s
        with self._lock:
            old = [j for j, job in self._jobs.items() if job["finished"] and job["finished"] < cutoff]
            for job_id in old:
                key = self._jobs.pop(job_id)["idempotency_key"]
                if key is not None:
                    self._keys.pop(key, None)
            self._cache = {k: v for k, v in self._cache.items() if v[0] >= cutoff}
            return len(old)

    def cached(self, key):
        with self._lock:
            hit = self._cache.get(key)
            return None if hit is None else copy.deepcopy(hit[1])

    def remember(self, key, result):
        with self._lock:
            self._cache[key] = (time.time(), copy.deepcopy(result))

    # -- model server membership ----------------------------------------------
    def set_member(self, url, member, where=None):
        with self._lock:
            self._members[url] = {"member": bool(member), "where": dict(where or {}), "updated": time.time()}

    def members(self):
        with self._lock:
            return copy.deepcopy(self._members)
