"""Jobs, their tasks and results, and the result cache, in an embedded SQLite database.

The store is the truth: every gunicorn worker (and every LIBERO worker process)
opens the same file, so any of them answers for any job. WAL mode lets readers
run beside the one writer; each thread has its own connection. The schema is
versioned with ``PRAGMA user_version``; a database written by a newer version
is refused rather than misread.

States: ``queued`` -> ``running`` -> ``done`` | ``failed`` | ``cancelled``.
"""

from __future__ import annotations

import json
import pathlib
import sqlite3
import threading
import time
from typing import Any, Iterable

SCHEMA_VERSION = 1
TERMINAL = ("done", "failed", "cancelled")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    heartbeat REAL,
    owner TEXT,
    idempotency_key TEXT UNIQUE,
    request TEXT NOT NULL,
    total INTEGER NOT NULL,
    error TEXT,
    result TEXT
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created);
CREATE TABLE IF NOT EXISTS tasks (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    score REAL,
    result TEXT,
    units_done INTEGER NOT NULL DEFAULT 0,
    units_total INTEGER NOT NULL DEFAULT 0,
    cached INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, idx)
);
CREATE TABLE IF NOT EXISTS pool_members (
    url TEXT PRIMARY KEY,
    member INTEGER NOT NULL,
    "where" TEXT NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cache (
    key TEXT PRIMARY KEY,
    result TEXT NOT NULL,
    created REAL NOT NULL
);
"""


class StoreError(RuntimeError):
    """The store cannot be opened or written (a path, permission or full-disk problem); the message says which."""


class SQLiteStore:
    def __init__(self, path: str | pathlib.Path, *, timeout_s: float = 10.0) -> None:
        self.path = pathlib.Path(path)
        self.timeout_s = timeout_s
        self._local = threading.local()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the data directory {str(self.path.parent)!r}: {exc}") from exc
        try:
            db = self._db()
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{str(self.path)!r} has schema version {version}, newer than this app's "
                                 f"{SCHEMA_VERSION}: use a newer app or another data_dir")
            db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot create the job store {str(self.path)!r}: {exc}") from exc

    def reopen_spec(self) -> tuple:
        """How another process opens this store (a LIBERO worker reporting progress)."""
        return ("sqlite", str(self.path))

    # -- connections --------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                db = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoints, never corrupt
                db.execute("PRAGMA foreign_keys = ON")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open the job store {str(self.path)!r}: {exc}") from exc
            db.row_factory = sqlite3.Row
            self._local.db = db
        return db

    class _Tx:
        def __init__(self, store: "SQLiteStore") -> None:
            self.db = store._db()
            self.path = store.path

        def __enter__(self) -> sqlite3.Connection:
            try:
                self.db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot write the job store {str(self.path)!r}: {exc}") from exc
            return self.db

        def __exit__(self, kind, exc, tb) -> None:
            if kind is None:
                try:
                    self.db.execute("COMMIT")
                    return
                except sqlite3.Error as error:
                    exc = error
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot write the job store {str(self.path)!r}: {exc}") from exc

    def _write(self) -> "_Tx":
        return SQLiteStore._Tx(self)

    def _read(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        try:
            return self._db().execute(sql, tuple(args)).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the job store {str(self.path)!r}: {exc}") from exc

    # -- jobs ---------------------------------------------------------------
    def create_job(self, job_id: str, request: dict, specs: list[dict], units: list[int], *,
                   idempotency_key: str | None = None) -> tuple[str, bool]:
        """(job id, created). With a key already used, the existing job's id and False."""
        now = time.time()
        with self._write() as db:
            if idempotency_key is not None:
                row = db.execute("SELECT id FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
                if row is not None:
                    return row["id"], False
            db.execute("INSERT INTO jobs (id, state, created, idempotency_key, request, total) VALUES (?, ?, ?, ?, ?, ?)",
                       (job_id, "queued", now, idempotency_key, json.dumps(request), len(specs)))
            db.executemany("INSERT INTO tasks (job_id, idx, spec, state, units_total) VALUES (?, ?, ?, ?, ?)",
                           [(job_id, i, json.dumps(spec), "queued", u) for i, (spec, u) in enumerate(zip(specs, units))])
        return job_id, True

    def find_idempotent(self, key: str) -> tuple[str, dict] | None:
        """(job id, its request) of the job an Idempotency-Key made, if any."""
        rows = self._read("SELECT id, request FROM jobs WHERE idempotency_key = ?", (key,))
        return (rows[0]["id"], json.loads(rows[0]["request"])) if rows else None

    def start_job(self, job_id: str, owner: str) -> bool:
        """Queued -> running; False when it was cancelled meanwhile."""
        now = time.time()
        with self._write() as db:
            changed = db.execute("UPDATE jobs SET state = 'running', started = ?, heartbeat = ?, owner = ? "
                                 "WHERE id = ? AND state = 'queued'", (now, now, owner, job_id)).rowcount
        return bool(changed)

    def heartbeat(self, job_ids: list[str]) -> None:
        if job_ids:
            with self._write() as db:
                db.executemany("UPDATE jobs SET heartbeat = ? WHERE id = ? AND state IN ('queued', 'running')",
                               [(time.time(), j) for j in job_ids])

    def progress(self, job_id: str, idx: int, units_done: int) -> None:
        with self._write() as db:
            db.execute("UPDATE tasks SET units_done = ?, state = CASE state WHEN 'queued' THEN 'running' ELSE state END "
                       "WHERE job_id = ? AND idx = ?", (units_done, job_id, idx))

    def finish_task(self, job_id: str, idx: int, score: float, result: dict, *, cached: bool = False) -> None:
        with self._write() as db:
            db.execute("UPDATE tasks SET state = CASE state WHEN 'cancelled' THEN state ELSE ? END, score = ?, "
                       "result = ?, cached = ?, units_done = units_total WHERE job_id = ? AND idx = ?",
                       ("failed" if result.get("error") else "done", score, json.dumps(result), int(cached),
                        job_id, idx))

    def finish_job(self, job_id: str, state: str, result: dict | None = None, error: str | None = None) -> None:
        """End a job; a job cancelled meanwhile stays cancelled but still gets its (partial) result."""
        with self._write() as db:
            db.execute("UPDATE jobs SET state = CASE state WHEN 'cancelled' THEN state ELSE ? END, "
                       "finished = COALESCE(finished, ?), result = ?, error = COALESCE(error, ?) "
                       "WHERE id = ? AND result IS NULL AND state IN ('queued', 'running', 'cancelled')",
                       (state, time.time(), None if result is None else json.dumps(result), error, job_id))

    def cancel(self, job_id: str) -> str | None:
        """Cancel a job that has not ended; returns its state afterwards (None: no such job)."""
        with self._write() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["state"] in TERMINAL:
                return row["state"]
            db.execute("UPDATE jobs SET state = 'cancelled', finished = ?, error = ? WHERE id = ?",
                       (time.time(), "cancelled by request", job_id))
            db.execute("UPDATE tasks SET state = 'cancelled' WHERE job_id = ? AND state IN ('queued', 'running')",
                       (job_id,))
        return "cancelled"

    def state(self, job_id: str) -> str | None:
        rows = self._read("SELECT state FROM jobs WHERE id = ?", (job_id,))
        return rows[0]["state"] if rows else None

    def get(self, job_id: str, *, with_tasks: bool = True) -> dict | None:
        rows = self._read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            return None
        job = dict(rows[0])
        job["request"] = json.loads(job["request"])
        job["result"] = json.loads(job["result"]) if job["result"] else None
        if with_tasks:
            job["tasks"] = [
                {**dict(t), "spec": json.loads(t["spec"]), "result": json.loads(t["result"]) if t["result"] else None}
                for t in self._read("SELECT idx, spec, state, score, result, units_done, units_total, cached "
                                    "FROM tasks WHERE job_id = ? ORDER BY idx", (job_id,))]
        return job

    def list(self, *, limit: int, offset: int) -> tuple[list[dict], int]:
        total = self._read("SELECT COUNT(*) AS n FROM jobs")[0]["n"]
        rows = self._read("SELECT j.id, j.state, j.created, j.started, j.finished, j.total, j.error, "
                          "(SELECT COUNT(*) FROM tasks t WHERE t.job_id = j.id AND t.state IN ('done', 'failed')) AS done "
                          "FROM jobs j ORDER BY j.created DESC LIMIT ? OFFSET ?", (limit, offset))
        return [dict(r) for r in rows], total

    def list_active(self, limit: int = 10) -> list[dict]:
        """Queued and running jobs, newest first (the dashboard keeps long jobs in view)."""
        rows = self._read("SELECT j.id, j.state, j.created, j.started, j.finished, j.total, j.error, "
                          "(SELECT COUNT(*) FROM tasks t WHERE t.job_id = j.id AND t.state IN ('done', 'failed')) AS done "
                          "FROM jobs j WHERE j.state IN ('queued', 'running') ORDER BY j.created DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows]

    def fail_stale(self, older_than_s: float) -> list[str]:
        """Jobs queued or running whose owner stopped beating: failed, with the reason."""
        cutoff = time.time() - older_than_s
        with self._write() as db:
            stale = [r["id"] for r in db.execute(
                "SELECT id FROM jobs WHERE state IN ('queued', 'running') AND COALESCE(heartbeat, created) < ?",
                (cutoff,))]
            for job_id in stale:
                db.execute("UPDATE jobs SET state = 'failed', finished = ?, error = ? WHERE id = ?",
                           (time.time(), "the app process running this job stopped before it finished "
                                         "(no heartbeat); finished tasks keep their results; resubmit for the rest",
                            job_id))
                db.execute("UPDATE tasks SET state = 'failed' WHERE job_id = ? AND state IN ('queued', 'running')",
                           (job_id,))
        return stale

    def expire(self, older_than_s: float) -> int:
        cutoff = time.time() - older_than_s
        with self._write() as db:
            removed = db.execute("DELETE FROM jobs WHERE finished IS NOT NULL AND finished < ?", (cutoff,)).rowcount
            db.execute("DELETE FROM cache WHERE created < ?", (cutoff,))
        return removed

    # -- result cache -------------------------------------------------------
    def cached(self, key: str) -> dict | None:
        rows = self._read("SELECT result FROM cache WHERE key = ?", (key,))
        return json.loads(rows[0]["result"]) if rows else None

    def remember(self, key: str, result: dict) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO cache (key, result, created) VALUES (?, ?, ?)",
                       (key, json.dumps(result), time.time()))

    # -- model server membership ----------------------------------------------
    def set_member(self, url: str, member: bool, where: dict | None = None) -> None:
        """A model server joined (``member``) or left the pool by hand or by a launcher; every app
        process follows it (a table beside the jobs: older apps ignore it, so no schema version bump)."""
        with self._write() as db:
            db.execute('INSERT OR REPLACE INTO pool_members (url, member, "where", updated) VALUES (?, ?, ?, ?)',
                       (url, int(bool(member)), json.dumps(where or {}), time.time()))

    def members(self) -> dict[str, dict]:
        rows = self._read('SELECT url, member, "where", updated FROM pool_members')
        return {r["url"]: {"member": bool(r["member"]), "where": json.loads(r["where"]), "updated": r["updated"]}
                for r in rows}


class UnusableStore:
    """Stands in when the store cannot be opened: every call raises the reason, so the app stays up and says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def heartbeat(self, job_ids: list[str]) -> None:
        if job_ids:
            raise StoreError(self.reason)

    def __getattr__(self, name: str):
        def unusable(*args, **kwargs):
            raise StoreError(self.reason)

        return unusable
