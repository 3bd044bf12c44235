"""The job store in Redis, for reward apps on several hosts (``job_store = "redis"``, ``redis_url``).

Same interface and states as the SQLite store. Layout, under a prefix (default ``pi0``):

* ``{p}:job:{id}``: a hash of the job's fields (JSON for ``request`` and ``result``);
* ``{p}:job:{id}:{field}``: one hash per task field (``spec``, ``state``, ``score``, ``result``,
  ``units_done``, ``units_total``, ``cached``), keyed by task index, so progress is one ``HSET``;
* ``{p}:jobs``: job ids in a sorted set by creation time; ``{p}:idem:{key}``: the job of an
  Idempotency-Key; ``{p}:cache:{key}``: a cached result, expiring after the retention;
* ``{p}:pool_members``: model servers added or removed while the apps run, URL -> JSON.

State changes that must not race (start, cancel, finish) run as Lua scripts, which Redis executes
atomically.
"""

from __future__ import annotations

import json
import time

from pi0_reward_server.jobs.store_sqlite import StoreError

TASK_FIELDS = ("spec", "state", "score", "result", "units_done", "units_total", "cached")

_CREATE = """
-- KEYS: job, idem key (or ''), jobs zset, active set. ARGV: id, now, request, total, idem ttl, then spec, units ...
if KEYS[2] ~= '' then
  local existing = redis.call('GET', KEYS[2])
  if existing then return existing end
  redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[5])
  redis.call('HSET', KEYS[1], 'idempotency_key', string.sub(KEYS[2], string.len(ARGV[6]) + 1))
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'state', 'queued', 'created', ARGV[2], 'request', ARGV[3], 'total', ARGV[4])
local n = tonumber(ARGV[4])
for i = 0, n - 1 do
  redis.call('HSET', KEYS[1] .. ':spec', i, ARGV[7 + 2 * i])
  redis.call('HSET', KEYS[1] .. ':units_total', i, ARGV[8 + 2 * i])
  redis.call('HSET', KEYS[1] .. ':state', i, 'queued')
  redis.call('HSET', KEYS[1] .. ':units_done', i, 0)
  redis.call('HSET', KEYS[1] .. ':cached', i, 0)
end
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
return false
"""
_START = """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'running', 'started', ARGV[1], 'heartbeat', ARGV[1], 'owner', ARGV[2])
return 1
"""
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
if state == 'done' or state == 'failed' or state == 'cancelled' then return state end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished', ARGV[1], 'error', 'cancelled by request')
redis.call('SREM', KEYS[3], ARGV[2])
local states = redis.call('HGETALL', KEYS[2])
for i = 1, #states, 2 do
  if states[i + 1] == 'queued' or states[i + 1] == 'running' then redis.call('HSET', KEYS[2], states[i], 'cancelled') end
end
return 'cancelled'
"""
_FINISH_JOB = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or redis.call('HEXISTS', KEYS[1], 'result') == 1 then return 0 end
if state == 'done' or state == 'failed' then return 0 end
if state ~= 'cancelled' then redis.call('HSET', KEYS[1], 'state', ARGV[1]) end
if redis.call('HEXISTS', KEYS[1], 'finished') == 0 then redis.call('HSET', KEYS[1], 'finished', ARGV[2]) end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'result', ARGV[3]) end
if ARGV[4] ~= '' and redis.call('HEXISTS', KEYS[1], 'error') == 0 then redis.call('HSET', KEYS[1], 'error', ARGV[4]) end
redis.call('SREM', KEYS[2], ARGV[5])
return 1
"""
_PROGRESS = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if redis.call('HGET', KEYS[2], ARGV[1]) == 'queued' then redis.call('HSET', KEYS[2], ARGV[1], 'running') end
return 1
"""
_FINISH_TASK = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= 'cancelled' then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[5])
redis.call('HSET', KEYS[5], ARGV[1], redis.call('HGET', KEYS[6], ARGV[1]))
return 1
"""


class RedisStore:
    def __init__(self, url: str, *, prefix: str = "pi0", retention_s: float = 7 * 86400.0) -> None:
        try:
            import redis
        except ImportError as exc:
            raise StoreError("job_store = 'redis' needs the redis package: pip install -e '.[redis]'") from exc
        self.url, self.prefix, self.retention_s = url, prefix, retention_s
        self._errors = (redis.RedisError, OSError)
        try:
            self._redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5)
            self._redis.ping()
        except (redis.RedisError, OSError, ValueError) as exc:
            raise StoreError(f"cannot reach the Redis job store at {_safe(url)}: {exc}") from exc
        self._create = self._redis.register_script(_CREATE)
        self._start = self._redis.register_script(_START)
        self._cancel = self._redis.register_script(_CANCEL)
        self._finish_job = self._redis.register_script(_FINISH_JOB)
        self._finish_task = self._redis.register_script(_FINISH_TASK)
        self._progress = self._redis.register_script(_PROGRESS)

    def reopen_spec(self) -> tuple:
        return ("redis", self.url, self.prefix)

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self._errors as exc:
            raise StoreError(f"the Redis job store at {_safe(self.url)} failed: {exc}") from exc

    # -- jobs ---------------------------------------------------------------
    def create_job(self, job_id, request, specs, units, *, idempotency_key=None):
        """One script: the key and the job appear together or not at all (no key pointing at no job)."""
        idem_prefix = self._key("idem", "")
        args = [job_id, time.time(), json.dumps(request), len(specs), max(1, int(self.retention_s)), idem_prefix]
        for spec, unit in zip(specs, units):
            args += [json.dumps(spec), unit]
        existing = self._call(self._create, keys=[self._key("job", job_id),
                                                  idem_prefix + idempotency_key if idempotency_key else "",
                                                  self._key("jobs"), self._key("active")], args=args)
        return (existing, False) if existing else (job_id, True)

    def find_idempotent(self, key):
        job_id = self._call(self._redis.get, self._key("idem", key))
        request = self._call(self._redis.hget, self._key("job", job_id), "request") if job_id else None
        return (job_id, json.loads(request)) if request else None

    def start_job(self, job_id, owner):
        return bool(self._call(self._start, keys=[self._key("job", job_id)], args=[time.time(), owner]))

    def heartbeat(self, job_ids):
        if not job_ids:
            return
        pipe = self._redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hset(self._key("job", job_id), "heartbeat", time.time())
        self._call(pipe.execute)

    def progress(self, job_id, idx, units_done):
        job = self._key("job", job_id)
        self._call(self._progress, keys=[f"{job}:units_done", f"{job}:state"], args=[idx, units_done])

    def finish_task(self, job_id, idx, score, result, *, cached=False):
        job = self._key("job", job_id)
        self._call(self._finish_task, keys=[f"{job}:state", f"{job}:score", f"{job}:result", f"{job}:cached",
                                            f"{job}:units_done", f"{job}:units_total"],
                   args=[idx, "failed" if result.get("error") else "done", score, json.dumps(result), int(cached)])

    def finish_job(self, job_id, state, result=None, error=None):
        self._call(self._finish_job, keys=[self._key("job", job_id), self._key("active")],
                   args=[state, time.time(), "" if result is None else json.dumps(result), error or "", job_id])

    def cancel(self, job_id):
        job = self._key("job", job_id)
        return self._call(self._cancel, keys=[job, f"{job}:state", self._key("active")], args=[time.time(), job_id])

    def state(self, job_id):
        return self._call(self._redis.hget, self._key("job", job_id), "state")

    def get(self, job_id, *, with_tasks=True):
        job_key = self._key("job", job_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hgetall(job_key)
        for field in TASK_FIELDS:
            pipe.hgetall(f"{job_key}:{field}")
        raw, *fields = self._call(pipe.execute)
        if not raw:
            return None
        job = {k: raw.get(k) for k in ("id", "state", "owner", "idempotency_key", "error")}
        for k in ("created", "started", "finished", "heartbeat"):
            job[k] = float(raw[k]) if raw.get(k) else None
        job["total"] = int(raw["total"])
        job["request"] = json.loads(raw["request"])
        job["result"] = json.loads(raw["result"]) if raw.get("result") else None
        if with_tasks:
            columns = dict(zip(TASK_FIELDS, fields))
            job["tasks"] = [{
                "idx": i, "spec": json.loads(columns["spec"][str(i)]), "state": columns["state"][str(i)],
                "score": float(columns["score"][str(i)]) if str(i) in columns["score"] else None,
                "result": json.loads(columns["result"][str(i)]) if str(i) in columns["result"] else None,
                "units_done": int(columns["units_done"].get(str(i), 0)),
                "units_total": int(columns["units_total"].get(str(i), 0)),
                "cached": int(columns["cached"].get(str(i), 0)),
            } for i in range(job["total"])]
        return job

    def list(self, *, limit, offset):
        total = self._call(self._redis.zcard, self._key("jobs"))
        ids = self._call(self._redis.zrevrange, self._key("jobs"), offset, offset + limit - 1)
        page = []
        for job_id in ids:
            job = self.get(job_id)
            if job is None:
                continue
            summary = {k: job[k] for k in ("id", "state", "created", "started", "finished", "total", "error")}
            summary["done"] = sum(t["state"] in ("done", "failed") for t in job["tasks"])
            page.append(summary)
        return page, total

    def list_active(self, limit=10):
        page = []
        for job_id in self._call(self._redis.smembers, self._key("active")):  # only queued and running jobs
            job = self.get(job_id)
            if job is not None and job["state"] in ("queued", "running"):
                summary = {k: job[k] for k in ("id", "state", "created", "started", "finished", "total", "error")}
                summary["done"] = sum(t["state"] in ("done", "failed") for t in job["tasks"])
                page.append(summary)
        return sorted(page, key=lambda j: j["created"], reverse=True)[:limit]

    def fail_stale(self, older_than_s):
        cutoff = time.time() - older_than_s
        stale = []
        for job_id in self._call(self._redis.smembers, self._key("active")):  # only queued and running jobs
            raw = self._call(self._redis.hmget, self._key("job", job_id), "state", "heartbeat", "created")
            state, beat, created = raw
            if state not in ("queued", "running"):
                self._call(self._redis.srem, self._key("active"), job_id)
            elif float(beat or created or 0) < cutoff:
                self.finish_job(job_id, "failed", error="the app process running this job stopped before it "
                                                        "finished (no heartbeat); finished tasks keep their results; "
                                                        "resubmit for the rest")
                job = self._key("job", job_id)
                for idx, task_state in self._call(self._redis.hgetall, f"{job}:state").items():
                    if task_state in ("queued", "running"):
                        self._call(self._redis.hset, f"{job}:state", idx, "failed")
                stale.append(job_id)
        return stale

    def expire(self, older_than_s):
        cutoff = time.time() - older_than_s
        removed = 0
        for job_id in self._call(self._redis.zrangebyscore, self._key("jobs"), 0, cutoff):
            job = self._key("job", job_id)
            finished = self._call(self._redis.hget, job, "finished")
            if finished and float(finished) < cutoff:
                self._call(self._redis.delete, job, *(f"{job}:{f}" for f in TASK_FIELDS))
                self._call(self._redis.zrem, self._key("jobs"), job_id)
                removed += 1
        return removed  # cached results expire by themselves (TTL)

    # -- result cache -------------------------------------------------------
    def cached(self, key):
        raw = self._call(self._redis.get, self._key("cache", key))
        return json.loads(raw) if raw else None

    def remember(self, key, result):
        self._call(self._redis.set, self._key("cache", key), json.dumps(result), ex=max(1, int(self.retention_s)))

    # -- model server membership ----------------------------------------------
    def set_member(self, url, member, where=None):
        entry = {"member": bool(member), "where": where or {}, "updated": time.time()}
        self._call(self._redis.hset, self._key("pool_members"), url, json.dumps(entry))

    def members(self):
        raw = self._call(self._redis.hgetall, self._key("pool_members"))
        return {url: json.loads(entry) for url, entry in raw.items()}


def _safe(url: str) -> str:
    """The URL without its password, for messages and logs."""
    import urllib.parse

    parsed = urllib.parse.urlsplit(url)
    if parsed.password:
        netloc = f"{parsed.username or ''}:***@{parsed.hostname}" + (f":{parsed.port}" if parsed.port else "")
        return urllib.parse.urlunsplit(parsed._replace(netloc=netloc))
    return url

