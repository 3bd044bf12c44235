"""The reward app: ``POST /score``, jobs (``POST /jobs``, ``GET /jobs``, ``GET|DELETE /jobs/<id>``,
``GET /jobs/<id>/events``), ``GET /pool_status``, ``GET /health``, ``GET /metrics``, ``GET /dashboard``;
admin routes (the token): ``POST /admin/models/<name>/reload``, ``POST|DELETE /admin/pool/servers``.

Run it with ``flask --app 'pi0_reward_server.app:create_app()' run`` in
development or ``gunicorn -c pi0_reward_server/gunicorn_config.py
'pi0_reward_server.app:create_app()'`` in production. Each worker process
builds its own client pool when the app is created (``preload_app = False``),
so no socket or thread crosses a fork.
"""

from __future__ import annotations

import atexit
import hmac
import importlib.util
import json
import logging
import os
import pathlib
import threading
import time
import urllib.parse
from typing import Any, Mapping

from flask import Flask, Response, jsonify, request, stream_with_context
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from pi0_reward_server import metrics
from pi0_reward_server.client_pool import ClientPool, check_server_url
from pi0_reward_server.config import AppConfig, ConfigError, load_config
from pi0_reward_server.integrations.openrlhf import blueprint as openrlhf_blueprint
from pi0_reward_server.jobs.runner import JobRunner
from pi0_reward_server.jobs.store_memory import MemoryStore
from pi0_reward_server.jobs.store_sqlite import TERMINAL, SQLiteStore, StoreError, UnusableStore
from pi0_reward_server.kinds.registry import run_tasks
from pi0_reward_server.policies import DeadlinePolicy, PoolPolicy
from pi0_reward_server.kinds.registry import Limits, TaskError, parse_task, task_work, validate_kwargs

logger = logging.getLogger("pi0_reward_server")
MAX_WHERE_FIELDS = 16  # what a registrar may say about where a server runs (node, actor, GPUs)
MAX_STREAMS = 8  # event streams open at once per worker process (each holds a request thread)
STREAM_SECONDS = 600.0  # then the stream ends and the client reconnects (its retry is 2 s)


class BadRequest(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class Admission:
    """Bounds the tasks in flight in this process, so load beyond it is refused, not queued."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inflight = 0
        self._lock = threading.Lock()

    def acquire(self, n: int) -> bool:
        """``n`` must not exceed the limit (such a request is refused as too large before it gets here)."""
        with self._lock:
            if self.inflight + n > self.limit:
                return False
            self.inflight += n
        metrics.inflight_tasks.inc(n)
        return True

    def release(self, n: int) -> None:
        with self._lock:
            self.inflight -= n
        metrics.inflight_tasks.dec(n)


def create_app(config: AppConfig | Mapping[str, Any] | None = None, *, pool: ClientPool | None = None) -> Flask:
    """Build the app. ``config`` overrides the file and environment layers."""
    settings = config if isinstance(config, AppConfig) else load_config(config)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["REWARD"] = settings
    pool_options = dict(
        connections_per_server=settings.connections_per_server,
        max_connections_per_server=settings.max_connections_per_server,
        acquire_timeout_s=settings.acquire_timeout_s,
        request_timeout_s=settings.request_timeout_s,
        connect_timeout_s=settings.connect_timeout_s,
        health_interval_s=settings.health_interval_s,
        probe_interval_s=settings.probe_interval_s,
        backoff_initial_s=settings.backoff_initial_s,
        backoff_max_s=settings.backoff_max_s,
        retries=settings.retries,
        api_key=settings.model_api_key,
    )
    if settings.execution == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError("execution = 'ray' needs the ray extra: pip install -e '.[ray]' (scripts/install_ray.sh)")
    # What membership starts from: the configured servers, or those of a pool handed in (which may differ:
    # only additions and removals recorded in the store change it).
    base_urls = list(settings.model_servers) if pool is None else pool.urls
    if pool is None:
        pool = ClientPool(settings.model_servers, **pool_options).start(wait_s=settings.connect_timeout_s)
    for url in settings.model_servers:
        if url in pool.urls:
            pool.add_server(url, {"source": "config", "host": urllib.parse.urlparse(url).hostname})
    app.extensions["client_pool"] = pool
    limits = Limits(
        max_episodes=settings.max_episodes_per_task,
        max_steps=settings.max_steps_per_episode,
        default_episodes=settings.default_episodes,
        default_seed=settings.default_seed,
    )
    logger.info("reward app: %d model server(s) configured, %d up, auth %s",
                len(settings.model_servers), pool.healthy_servers, "on" if settings.token else "off")

    runners: list = []
    runners_lock = threading.Lock()

    def libero_runner():
        """Worker processes for LIBERO tasks, started on first use (spawned, after any gunicorn fork)."""
        from pi0_reward_server.jobs.processes import ProcessRunner

        with runners_lock:
            if not runners:
                runner = ProcessRunner(lambda: pool.urls, pool_options, settings.libero_processes)
                atexit.register(runner.close)  # workers also exit by themselves if this process dies
                runners.append(runner)
            return runners[0]

    def ray_runner():
        """The Ray runner, made when the app is (after any gunicorn fork: each worker is its own driver).
        Not on first use: a Ray started here ties its own processes (GCS, raylet) to the thread that started
        it, and a job's thread ends with its job."""
        from pi0_reward_server.scale.ray_rollouts import RayRunner

        with runners_lock:
            found = [r for r in runners if isinstance(r, RayRunner)]
            if found:
                return found[0]
            runner = RayRunner(urls=lambda: pool.urls, pool_options=pool_options,
                               failure_score=settings.failure_score, address=settings.ray_address or None,
                               task_cpus=settings.ray_task_cpus, max_retries=settings.ray_max_retries,
                               num_cpus=settings.ray_num_cpus or None)
            atexit.register(runner.close)
            runners.append(runner)
            return runner

    app.extensions["libero_runners"] = runners  # every runner close_app must close (worker processes, Ray)
    if settings.execution == "ray":
        ray_runner()  # connect (or start Ray) now, on this long-lived thread, and fail at start if it cannot
    admission = Admission(settings.max_inflight_tasks)
    app.extensions["admission"] = admission

    def authorized() -> bool:
        if not settings.token:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, credential = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(credential.strip().encode(), settings.token.encode())

    def retry_later(status: int, message: str):
        response = jsonify(error=message)
        response.status_code = status
        response.headers["Retry-After"] = "5"
        return response

    def unauthorized():
        response = jsonify(error="unauthorized: send 'Authorization: Bearer <token>'")
        response.status_code = 401
        response.headers["WWW-Authenticate"] = 'Bearer realm="pi0-reward-server"'
        return response

    def parse_body(body: Any = None) -> tuple[list, dict[str, Any], int]:
        """The request's JSON body (or ``body``, built by an adapter route), validated."""
        if body is None:
            try:
                body = request.get_json(silent=True, force=True)
            except RecursionError:
                raise BadRequest("body", "JSON nests too deeply") from None
        if body is None:
            raise BadRequest("body", "must be a JSON object (Content-Type: application/json)")
        if not isinstance(body, dict):
            raise BadRequest("body", f"must be a JSON object, got {type(body).__name__}")
        unknown = sorted(set(body) - {"responses", "reward_function_kwargs"})
        if unknown:
            raise BadRequest("body", f"unknown field(s) {unknown}; expected 'responses' and 'reward_function_kwargs'")
        responses = body.get("responses")
        if not isinstance(responses, list):
            raise BadRequest("responses", f"must be a list, got {type(responses).__name__}")
        if not responses:
            raise BadRequest("responses", "must hold at least one response")
        if len(responses) > settings.max_responses:
            raise BadRequest("responses", f"holds {len(responses)} responses; at most {settings.max_responses} per request")
        try:
            kwargs = validate_kwargs(body.get("reward_function_kwargs"), limits)
        except TaskError as exc:
            raise BadRequest(exc.field, str(exc)) from None
        healthy = pool.healthy_servers
        max_workers = kwargs.get("max_workers", max(1, min(healthy, settings.max_workers_cap)))
        if not isinstance(max_workers, int) or isinstance(max_workers, bool) or not 1 <= max_workers <= settings.max_workers_cap:
            raise BadRequest("reward_function_kwargs.max_workers", f"must be an integer between 1 and {settings.max_workers_cap}, got {max_workers!r}")
        return responses, kwargs, max_workers

    try:
        if settings.job_store == "memory":
            store = MemoryStore()
        elif settings.job_store == "redis":
            from pi0_reward_server.jobs.store_redis import RedisStore

            store = RedisStore(settings.redis_url, retention_s=settings.job_retention_s)
        else:
            store = SQLiteStore(pathlib.Path(settings.data_dir) / "jobs.sqlite3")
    except StoreError as exc:  # serve what needs no store (/health, /pool_status); work answers 503 saying why
        logger.error("the job store is not usable: %s", exc)
        store = UnusableStore(str(exc))
    app.extensions["job_store"] = store

    def run_job_tasks(tasks: list, max_workers: int, deadline: float, trackers: list, on_result) -> list:
        if settings.execution == "ray":
            return ray_runner().run(tasks, max_workers, deadline, trackers, on_result)
        budget = max(0.0, deadline - time.monotonic())
        offload = None
        if settings.libero_execution == "process" and any(t.backend == "libero" for t in tasks):
            runner = libero_runner()
            offload = lambda task, tracker: runner.run(task, deadline, budget, settings.failure_score,  # noqa: E731
                                                       tracker)
        return run_tasks(tasks, lambda model: DeadlinePolicy(PoolPolicy(pool, model), deadline, budget),
                         max_workers=max_workers, failure_score=settings.failure_score, offload=offload,
                         trackers=trackers, on_result=on_result)

    jobs = JobRunner(store, run_tasks=run_job_tasks, model_version=pool.model_version,
                     refresh_versions=lambda: pool.refresh_versions(max_age_s=0),
                     failure_score=settings.failure_score, max_concurrent_jobs=settings.max_concurrent_jobs,
                     job_stale_s=settings.job_stale_s, retention_s=settings.job_retention_s)
    app.extensions["job_runner"] = jobs
    atexit.register(jobs.close)

    def parse_work(body: Any = None) -> tuple[dict, list, dict[str, Any], int]:
        """The validated body, its tasks, kwargs and fan-out; BadRequest or TaskError on anything wrong."""
        responses, kwargs, max_workers = parse_body(body)
        tasks = [parse_task(i, response, kwargs, limits) for i, response in enumerate(responses)]
        steps, simulations = (sum(w) for w in zip(*(task_work(t, limits) for t in tasks)))
        if steps > settings.max_env_steps_per_request:
            raise BadRequest("responses", f"asks for up to {steps} environment steps; at most "
                                          f"{settings.max_env_steps_per_request} per request (split it)")
        if simulations > settings.max_simulations_per_request:
            raise BadRequest("responses", f"asks for up to {simulations} MCTS simulations; at most "
                                          f"{settings.max_simulations_per_request} per request (split it)")
        if len(tasks) > settings.max_inflight_tasks:
            raise BadRequest("responses", f"holds {len(tasks)} tasks; at most {settings.max_inflight_tasks} can be "
                                          "in flight in one app worker (max_inflight_tasks): split it")
        body = {"responses": responses, "reward_function_kwargs": kwargs}
        return body, tasks, kwargs, max_workers

    def store_message(exc: StoreError) -> str:
        """What a client may read of a store error: the reason, not the server's file paths."""
        return str(exc).replace(str(pathlib.Path(settings.data_dir).resolve()), "<data_dir>")

    def submit(deadline_s: float, *, immediate: bool, body: Any = None):
        """Validate, admit and submit: ((job id, created), None) or (None, an error response)."""
        deadline = time.monotonic() + deadline_s  # counted from the request's arrival, whatever it waits for
        try:
            body, tasks, kwargs, max_workers = parse_work(body)
        except (BadRequest, TaskError) as exc:
            return None, (jsonify(error=str(exc), field=exc.field), 400)
        key = request.headers.get("Idempotency-Key")
        if key is not None:
            if not (0 < len(key) <= 200 and key.isprintable()):
                return None, (jsonify(error="Idempotency-Key must be 1 to 200 printable characters",
                                      field="Idempotency-Key"), 400)
            existing = store.find_idempotent(key)  # a retry: no admission needed, and the same body or nothing
            if existing is not None:
                if existing[1] != body:
                    return None, (jsonify(error="Idempotency-Key was already used with a different body",
                                          field="Idempotency-Key", job_id=existing[0]), 422)
                return (existing[0], False), None
        if pool.healthy_servers == 0:
            metrics.admission_rejections.labels("no_model_server").inc()
            return None, retry_later(503, "no model server is usable; see /pool_status")
        if not admission.acquire(len(tasks)):
            metrics.admission_rejections.labels("busy").inc()
            return None, retry_later(429, f"busy: {admission.inflight} tasks in flight in this worker "
                                          f"(max_inflight_tasks={settings.max_inflight_tasks}); retry later")
        try:
            submitted = jobs.submit(body, tasks, max_workers=max_workers, deadline=deadline,
                                    use_cache=kwargs.get("cache", True), idempotency_key=key, immediate=immediate,
                                    on_end=lambda: admission.release(len(tasks)))
            rule = request.url_rule.rule if request.url_rule is not None else ""
            metrics.jobs_submitted.labels("openrlhf" if rule.startswith("/openrlhf") else
                                          "score" if immediate else "jobs").inc()
            return submitted, None
        except BaseException as exc:  # the job never started: its tasks were never admitted
            admission.release(len(tasks))
            if isinstance(exc, StoreError):
                metrics.admission_rejections.labels("store").inc()
                return None, retry_later(503, f"the job store is not usable: {store_message(exc)}")
            raise

    def score_and_wait(seconds: float, body: Any = None):
        """Submit and wait: (the job's result, None) or (None, an error response)."""
        submitted, error = submit(seconds, immediate=True, body=body)
        if error is not None:
            return None, error
        job_id, _ = submitted
        job = jobs.wait(job_id, seconds + 30)
        if job is not None and job["state"] not in TERMINAL:
            jobs.cancel(job_id)  # nobody will read it: stop its inference
            return None, (jsonify(error=f"job {job_id} did not finish within {seconds:g}s; it was cancelled "
                                        "(its finished tasks are cached: a retry continues from them)",
                                  job_id=job_id), 504)
        if job is None:
            return None, (jsonify(error=f"job {job_id} vanished from the store", job_id=job_id), 500)
        if job["state"] == "cancelled":  # not rewards: a trainer must not read failure scores as scores
            return None, (jsonify(error=f"job {job_id} was cancelled before it finished", job_id=job_id,
                                  state="cancelled", partial=job["result"]), 409)
        if job["result"] is None:
            return None, retry_later(503, f"job {job_id} failed: {job['error']}")
        return job["result"], None

    app.extensions["score_and_wait"] = score_and_wait

    @app.post("/score")
    def score():
        """Submit and wait: the same path as a job (on a thread of its own, never queued behind jobs),
        answered when it ends."""
        if not authorized():
            return unauthorized()
        result, error = score_and_wait(settings.max_request_seconds)
        return error or jsonify(result)

    def job_view(job: dict) -> dict:
        tasks = job.get("tasks", [])
        ended = [t for t in tasks if t["state"] in ("done", "failed") or t["result"] is not None]
        units_total = sum(t["units_total"] for t in tasks) or 1
        units_done = sum(t["units_done"] for t in tasks)
        view = {
            "id": job["id"], "state": job["state"], "created": job["created"], "started": job["started"],
            "finished": job["finished"], "error": job["error"],
            "tasks": {"total": job["total"], "done": len(ended)},
            "units": {"total": units_total, "done": units_done},
            "progress": round(units_done / units_total, 4),
            "partial_scores": [t["score"] for t in tasks],
        }
        if job["state"] == "running" and job["started"] and units_done:
            elapsed = time.time() - job["started"]
            view["eta_s"] = round(elapsed * (units_total - units_done) / units_done, 1)
        if job["state"] in TERMINAL:
            view["result"] = job["result"]
        return view

    def get_job_or_404(job_id: str):
        if not (0 < len(job_id) <= 64 and job_id.isalnum()):
            return None, (jsonify(error=f"no job {job_id[:64]!r}"), 404)
        job = store.get(job_id)
        if job is None:
            return None, (jsonify(error=f"no job {job_id!r} (unknown, or expired after job_retention_s)"), 404)
        return job, None

    streams = threading.BoundedSemaphore(MAX_STREAMS)
    app.register_blueprint(openrlhf_blueprint(authorized, unauthorized, score_and_wait, settings))

    @app.post("/jobs")
    def submit_job():
        if not authorized():
            return unauthorized()
        submitted, error = submit(settings.max_job_seconds, immediate=False)
        if error is not None:
            return error
        job_id, created = submitted
        response = jsonify(id=job_id, created=created, url=f"/jobs/{job_id}", events=f"/jobs/{job_id}/events")
        response.status_code = 202
        response.headers["Location"] = f"/jobs/{job_id}"
        return response

    @app.get("/jobs")
    def list_jobs():
        if not authorized():
            return unauthorized()
        try:
            limit = int(request.args.get("limit", 20))
            offset = int(request.args.get("offset", 0))
        except ValueError:
            return jsonify(error="limit and offset must be integers", field="query"), 400
        if not (1 <= limit <= 200 and 0 <= offset <= 10**9):
            return jsonify(error="limit must be 1 to 200 and offset at least 0", field="query"), 400
        items, total = store.list(limit=limit, offset=offset)
        return jsonify(jobs=items, total=total, limit=limit, offset=offset)

    @app.get("/jobs/<job_id>")
    def get_job(job_id: str):
        if not authorized():
            return unauthorized()
        job, error = get_job_or_404(job_id)
        return error or jsonify(job_view(job))

    @app.delete("/jobs/<job_id>")
    def cancel_job(job_id: str):
        if not authorized():
            return unauthorized()
        job, error = get_job_or_404(job_id)
        if error:
            return error
        state = jobs.cancel(job_id)
        return jsonify(id=job_id, state=state)

    @app.get("/jobs/<job_id>/events")
    def job_events(job_id: str):
        """Server-sent events: ``progress`` whenever the job moves, then one ``result`` (or ``end``), then the
        stream closes. The store is the truth; this only reports it."""
        if not authorized():
            return unauthorized()
        job, error = get_job_or_404(job_id)
        if error:
            return error

        if not streams.acquire(blocking=False):
            return retry_later(429, f"too many event streams open in this worker ({MAX_STREAMS}); "
                                    "poll GET /jobs/<id> instead, or retry later")

        def stream():
            opened = time.monotonic()
            last, sent, quiet_since = None, 0, time.monotonic()
            yield "retry: 2000\n\n"
            while True:
                job = store.get(job_id)
                if job is None:
                    yield f"event: end\ndata: {json.dumps({'id': job_id, 'state': 'expired'})}\n\n"
                    return
                view = job_view(job)
                terminal = job["state"] in TERMINAL and (job["result"] is not None or job["state"] != "done")
                progress = {k: view[k] for k in ("id", "state", "tasks", "units", "progress", "partial_scores")}
                if progress != last:  # the ETA changes every poll: it rides along, it does not trigger
                    sent += 1
                    last, quiet_since = progress, time.monotonic()
                    yield f"id: {sent}\nevent: progress\ndata: {json.dumps({**progress, 'eta_s': view.get('eta_s')})}\n\n"
                if terminal:
                    sent += 1
                    yield f"id: {sent}\nevent: result\ndata: {json.dumps(view)}\n\n"
                    return
                if time.monotonic() - opened > STREAM_SECONDS:
                    return  # a gthread thread is not held for a whole job: the client reconnects (retry)
                if time.monotonic() - quiet_since > 15:
                    quiet_since = time.monotonic()
                    yield ": keep-alive\n\n"
                time.sleep(0.25)

        response = Response(stream_with_context(stream()), mimetype="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        response.call_on_close(streams.release)  # also when the client leaves before the first event
        return response

    @app.post("/admin/models/<name>/reload")
    def reload_model(name: str):
        """Push a checkpoint for hosted model ``name`` to every model server; each server's outcome and
        version, and whether they now agree. Needs the token (refused when the app has none)."""
        if settings.token is None:  # not even from loopback: a local proxy would make that everyone
            return jsonify(error="admin routes need the app's token: set REWARD_SERVER_TOKEN"), 403
        if not authorized():
            return unauthorized()
        body = request.get_json(silent=True, force=True)
        if not isinstance(body, dict) or set(body) - {"checkpoint", "timeout_s"}:
            return jsonify(error="body: must be a JSON object {'checkpoint': '<path on the model servers>', "
                                 "'timeout_s': <optional, default 600>}", field="body"), 400
        checkpoint, timeout_s = body.get("checkpoint"), body.get("timeout_s", 600)
        if not isinstance(checkpoint, str) or not 0 < len(checkpoint) <= 4096:
            return jsonify(error="checkpoint: must be a path on the model servers (1-4096 characters)",
                           field="checkpoint"), 400
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 1 <= timeout_s <= 3600:
            return jsonify(error="timeout_s: must be a number of seconds from 1 to 3600", field="timeout_s"), 400
        if not (0 < len(name) <= 64 and all(c.isalnum() or c in "_.-" for c in name)):
            return jsonify(error=f"model name {name[:64]!r} is not a valid model name", field="name"), 400
        outcomes = pool.reload(name, checkpoint, timeout_s=float(timeout_s))
        versions = sorted({o["version"] for o in outcomes if o.get("ok")})
        failed = [o for o in outcomes if not o.get("ok")]
        if not failed and len(versions) == 1:
            message = f"all {len(outcomes)} model server(s) serve {name}@{versions[0]}"
        elif failed:
            message = (f"{len(failed)} of {len(outcomes)} model server(s) did not reload: "
                       + "; ".join(f"{o['url']}: {o.get('error')}" for o in failed)
                       + (" - the servers now disagree about the model's version" if len(outcomes) > len(failed)
                          else ""))
        else:
            message = f"the model servers loaded different versions: {versions}"
        logger.info("reload of %s from %s: %s", name, checkpoint, message)
        ok = not failed and len(versions) == 1
        serving = {s["url"]: s["versions"].get(name) for s in pool.status()["servers"]}  # what each serves now
        return jsonify(model=name, checkpoint=checkpoint, consistent=ok, message=message, servers=outcomes,
                       versions=serving), (200 if ok else 502)

    # Held across "read the store, change the pool" (the follower) and "write the store, change the pool"
    # (the admin routes): otherwise a follower round that read the store just before an admin change
    # would apply the old membership after it, undoing the change in this process.
    membership_lock = threading.Lock()

    def apply_membership() -> None:
        """Bring this process's pool to the membership every app process shares through the store: the
        configured servers, plus those added, less those removed, by hand or by a launcher."""
        with membership_lock:
            members = store.members()
            urls = [u for u in base_urls if members.get(u, {}).get("member", True)]
            urls += [u for u, m in members.items() if m["member"] and u not in urls]
            added, removed = pool.set_servers(urls, {u: m["where"] for u, m in members.items() if m["member"]})
        if added or removed:
            logger.info("pool membership: %d server(s); joined %s, left %s", len(urls), added, removed)

    def follow_membership() -> None:
        last_error = None
        while not stop_following.wait(settings.membership_interval_s) and not pool.closed:
            try:
                apply_membership()
                last_error = None
            except StoreError as exc:  # keep the pool as it is until the store answers again
                if str(exc) != last_error:  # once per outage, not once a second
                    logger.warning("cannot read the pool membership: %s", exc)
                last_error = str(exc)
            except Exception:  # noqa: BLE001 - the thread must outlive one bad round
                logger.error("following the pool membership failed", exc_info=True)

    stop_following = threading.Event()
    atexit.register(stop_following.set)
    app.extensions["stop_membership"] = stop_following
    try:
        apply_membership()  # servers added before this process started are in its pool from the start
    except StoreError as exc:
        logger.error("cannot read the pool membership: %s", exc)
    threading.Thread(target=follow_membership, name="pool-membership", daemon=True).start()

    def admin_refused():
        """The admin routes need the app's token, even from loopback (a local proxy would make that everyone)."""
        if settings.token is None:
            return jsonify(error="admin routes need the app's token: set REWARD_SERVER_TOKEN"), 403
        if not authorized():
            return unauthorized()
        return None

    def membership_body(fields: set[str]):
        body = request.get_json(silent=True, force=True)
        if not isinstance(body, dict) or set(body) - fields or "url" not in body:
            raise BadRequest("body", "must be a JSON object {'url': 'ws://host:port'"
                                     + (", 'where': {<where it runs>}}" if "where" in fields else "}"))
        try:
            url = check_server_url(body["url"])
        except ValueError as exc:
            raise BadRequest("url", str(exc)) from None
        where = body.get("where")
        if where is None:
            return url, None
        if (not isinstance(where, dict) or len(where) > MAX_WHERE_FIELDS
                or not all(isinstance(k, str) and len(k) <= 64 for k in where)
                or len(json.dumps(where)) > 4096):
            raise BadRequest("where", f"must be an object of at most {MAX_WHERE_FIELDS} fields (4 KiB of JSON)")
        return url, where

    @app.post("/admin/pool/servers")
    def add_pool_server():
        """A model server joins the pool of every app process (recorded in the job store; each process
        follows within ``membership_interval_s``, this one at once). Needs the token."""
        refused = admin_refused()
        if refused:
            return refused
        try:
            url, where = membership_body({"url", "where"})
        except BadRequest as exc:
            return jsonify(error=str(exc), field=exc.field), 400
        if where is None:  # a repeated registration without it keeps what was said before
            where = store.members().get(url, {}).get("where") or {}
        where = {**where, "source": where.get("source", "admin")}
        with membership_lock:
            store.set_member(url, True, where)
            added = pool.add_server(url, where)
            servers = pool.urls
        logger.info("model server %s added to the pool by request (%s)", url, where)
        return jsonify(url=url, added=added, servers=servers), (201 if added else 200)

    @app.delete("/admin/pool/servers")
    def remove_pool_server():
        """A model server leaves the pool of every app process; requests in flight there still get their
        answer (or a retry elsewhere). Needs the token."""
        refused = admin_refused()
        if refused:
            return refused
        try:
            url, _ = membership_body({"url"})
        except BadRequest as exc:
            return jsonify(error=str(exc), field=exc.field), 400
        with membership_lock:
            # Known from the store as well as from this process's pool: under gunicorn this process may not
            # have followed an addition made through another one yet, and the removal must still be recorded.
            member = store.members().get(url, {}).get("member", url in base_urls)
            if not member and url not in pool.urls:
                return jsonify(error=f"model server {url!r} is not in the pool", field="url",
                               servers=pool.urls), 404
            store.set_member(url, False)
            pool.remove_server(url)
            servers = pool.urls
        logger.info("model server %s removed from the pool by request", url)
        return jsonify(url=url, removed=True, servers=servers)

    @app.get("/pool_status")
    def pool_status():
        if not authorized():
            return unauthorized()
        return jsonify(pool.status())

    @app.get("/health")
    def health():
        up = pool.healthy_servers
        return jsonify(status="ok" if up else "unavailable", model_servers_up=up), (200 if up else 503)

    @app.before_request
    def bound_chunked_body():
        """Flask enforces ``max_body_bytes`` through Content-Length; a chunked body has none, and the stream
        werkzeug gives it stops silently at the limit, so an oversized body would be cut and scored."""
        if request.content_length is not None or "chunked" not in request.headers.get("Transfer-Encoding", "").lower():
            return None
        data = request.get_data(cache=True)  # at most max_body_bytes
        raw = request.environ.get("wsgi.input")
        if len(data) >= settings.max_body_bytes and raw is not None and raw.read(1):
            discarded = 0  # read a bounded amount more, so the client sees the 413 rather than a reset
            while discarded < settings.max_body_bytes and (chunk := raw.read(65536)):
                discarded += len(chunk)
            raise RequestEntityTooLarge(f"the body is larger than max_body_bytes ({settings.max_body_bytes} bytes)")
        return None

    @app.before_request
    def start_clock():
        request.environ["pi0.started"] = time.monotonic()

    @app.after_request
    def name_the_worker(response):
        response.headers["X-Reward-Worker"] = str(os.getpid())  # which gunicorn worker answered
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.http_requests.labels(route, request.method, str(response.status_code)).inc()
        started = request.environ.get("pi0.started")
        if started is not None:
            metrics.http_seconds.labels(route).observe(time.monotonic() - started)
        return response

    @app.get("/metrics")
    def prometheus_metrics():
        """Prometheus text format, across every worker process (see :mod:`pi0_reward_server.metrics`)."""
        if not authorized():
            return unauthorized()
        return Response(metrics.render(), mimetype=None, content_type=metrics.CONTENT_TYPE)

    @app.get("/dashboard")
    def dashboard():
        """A static page (no data in it) that polls ``/dashboard/data`` with the token it is given."""
        page = pathlib.Path(__file__).with_name("static") / "dashboard.html"
        return Response(page.read_bytes(), content_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-cache", "X-Frame-Options": "DENY",
                                 "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                                                            "style-src 'self' 'unsafe-inline'; img-src 'self' data:"})

    @app.get("/dashboard/data")
    def dashboard_data():
        """What the dashboard shows: the pool, the recent jobs with progress, counter totals across workers."""
        if not authorized():
            return unauthorized()
        items, total = store.list(limit=12, offset=0)
        active = store.list_active(10)  # long jobs stay in view however many short ones came after them
        ids = {i["id"] for i in active}
        shown = active + [i for i in items if i["id"] not in ids][:max(4, 12 - len(active))]
        recent = []
        for item in shown:
            job = store.get(item["id"])
            if job is not None:
                view = job_view(job)
                view.pop("result", None)
                view.pop("partial_scores", None)
                recent.append(view)
        return jsonify(time=time.time(), worker=os.getpid(), pool=pool.status(), jobs=recent, jobs_total=total,
                       totals=metrics.totals(), servers=metrics.server_totals(), inflight_tasks=admission.inflight)

    @app.errorhandler(StoreError)
    def store_failed(exc: StoreError):
        logger.error("job store error: %s", exc)
        return retry_later(503, f"the job store is not usable: {store_message(exc)}")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        response = jsonify(error=f"{exc.code} {exc.name}: {exc.description}")
        response.status_code = exc.code or 500
        return response

    @app.errorhandler(Exception)
    def internal_error(exc: Exception):
        logger.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
        return jsonify(error=f"internal error: {type(exc).__name__}"), 500

    return app
