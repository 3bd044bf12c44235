"""The reward app: ``POST /score``, ``GET /pool_status``, ``GET /health``.

Run it with ``flask --app 'pi0_reward_server.app:create_app()' run`` in
development or ``gunicorn -c pi0_reward_server/gunicorn_config.py
'pi0_reward_server.app:create_app()'`` in production. Each worker process
builds its own client pool when the app is created (``preload_app = False``),
so no socket or thread crosses a fork.
"""

from __future__ import annotations

import atexit
import hmac
import logging
import threading
import time
from typing import Any, Mapping

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from pi0_reward_server.client_pool import ClientPool
from pi0_reward_server.config import AppConfig, load_config
from pi0_reward_server.rollout import DeadlinePolicy, PoolPolicy, run_tasks
from pi0_reward_server.tasks import Limits, TaskError, parse_task, task_work, validate_kwargs

logger = logging.getLogger("pi0_reward_server")


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
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self.inflight -= n


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
    if pool is None:
        pool = ClientPool(settings.model_servers, **pool_options).start(wait_s=settings.connect_timeout_s)
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
        from pi0_reward_server.libero_backend import ProcessRunner

        with runners_lock:
            if not runners:
                runner = ProcessRunner(settings.model_servers, pool_options, settings.libero_processes)
                atexit.register(runner.close)  # workers also exit by themselves if this process dies
                runners.append(runner)
            return runners[0]

    app.extensions["libero_runners"] = runners
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

    def parse_body() -> tuple[list, dict[str, Any], int]:
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

    @app.post("/score")
    def score():
        if not authorized():
            return unauthorized()
        started = time.monotonic()
        try:
            responses, kwargs, max_workers = parse_body()
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
        except (BadRequest, TaskError) as exc:
            return jsonify(error=str(exc), field=exc.field), 400
        if not admission.acquire(len(tasks)):
            return retry_later(429, f"busy: {admission.inflight} tasks in flight in this worker "
                                    f"(max_inflight_tasks={settings.max_inflight_tasks}); retry later")
        try:
            return run_scoring(tasks, max_workers, started)
        finally:
            admission.release(len(tasks))

    def run_scoring(tasks: list, max_workers: int, started: float):
        if pool.healthy_servers == 0:
            return retry_later(503, "no model server is usable; see /pool_status")
        deadline = started + settings.max_request_seconds
        offload = None
        if settings.libero_execution == "process" and any(t.backend == "libero" for t in tasks):
            runner = libero_runner()
            offload = lambda task: runner.run(task, deadline, settings.max_request_seconds,  # noqa: E731
                                              settings.failure_score)
        results = run_tasks(
            tasks, lambda model: DeadlinePolicy(PoolPolicy(pool, model), deadline, settings.max_request_seconds),
            max_workers=max_workers, failure_score=settings.failure_score, offload=offload,
        )
        failures = sum(r.error is not None for r in results)
        return jsonify(
            scores=[r.score for r in results],
            details=[r.to_dict() for r in results],
            failures=failures,
            max_workers=max_workers,
            seconds=time.monotonic() - started,
        )

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
