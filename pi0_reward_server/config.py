"""The reward app's configuration: defaults -> file -> environment -> overrides.

Every field can be set in a TOML/JSON file (``REWARD_CONFIG=path``), by an
environment variable ``REWARD_<FIELD>`` (upper case), or by the mapping given
to ``create_app(config)``. Two shorthands name the model servers:
``MODEL_SERVERS="ws://host:8000,ws://other:8001"`` and
``GPU_PORTS="8000,8001"`` (on ``MODEL_HOST``, default 127.0.0.1). The bearer
token comes from ``REWARD_SERVER_TOKEN``, the model servers' API key from
``MODEL_SERVER_API_KEY``.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.parse
from typing import Any, Mapping

from gpu_worker.config import ConfigError, read_config_table

__all__ = ["AppConfig", "ConfigError", "load_config"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AppConfig:
    # Model servers
    model_servers: tuple[str, ...] = ("ws://127.0.0.1:8000",)
    connections_per_server: int = 2  # opened ahead of time
    max_connections_per_server: int = 64
    acquire_timeout_s: float = 60.0
    request_timeout_s: float = 120.0
    connect_timeout_s: float = 5.0
    health_interval_s: float = 2.0  # /healthz of servers in rotation
    probe_interval_s: float = 1.0  # /healthz of servers out of rotation (cheap; fixed, so a server rejoins fast)
    backoff_initial_s: float = 0.5  # reconnects (expensive) that failed back off from this ...
    backoff_max_s: float = 30.0  # ... doubling up to this
    retries: int = 2  # extra attempts, on other servers where possible
    model_api_key: str | None = None  # sent to model servers as "Authorization: Api-Key <key>"
    # Scoring
    max_workers_cap: int = 32
    max_inflight_tasks: int = 512  # per app worker process (gunicorn: per worker), over all requests; past it 429
    max_env_steps_per_request: int = 5_000_000  # rollouts: sum of episodes x step limit
    max_simulations_per_request: int = 20_000_000  # selfplay: sum of games x simulations x longest game
    libero_execution: str = "process"  # "process" (spawned workers; faster, measured) or "thread"
    libero_processes: int = 2  # worker processes for LIBERO tasks (each holds an environment, ~2 GB)
    # Scale-out on Ray (the "ray" extra): "local" runs tasks here (threads; LIBERO per libero_execution),
    # "ray" runs every task (gym, LIBERO, self-play) as a Ray task anywhere in the cluster.
    execution: str = "local"
    ray_address: str = ""  # "" starts a Ray instance in this process; "auto" joins this node's cluster; host:port
    ray_num_cpus: int = 0  # a Ray started here: CPUs it may use (0: all)
    ray_task_cpus: float = 1.0  # CPUs each rollout task reserves
    ray_max_retries: int = 3  # a task whose Ray worker dies is run again, at most this often
    membership_interval_s: float = 1.0  # how often each app process reads added/removed model servers
    max_request_seconds: float = 1700.0  # tasks still running then fail (under gunicorn's 1800 s timeout)
    max_responses: int = 1024
    max_episodes_per_task: int = 1000
    max_steps_per_episode: int = 100_000
    failure_score: float = 0.0
    default_episodes: int = 10
    default_seed: int = 0
    # Jobs and the result store
    job_store: str = "sqlite"  # "sqlite" (data_dir/jobs.sqlite3), "redis" (redis_url) or "memory" (one process)
    redis_url: str = "redis://127.0.0.1:6379/0"  # job_store = "redis": REWARD_REDIS_URL
    data_dir: str = "data"  # the SQLite job store (jobs.sqlite3) lives here
    max_job_seconds: float = 86400.0  # a job's tasks still running then fail
    max_concurrent_jobs: int = 8  # per app worker process; more wait queued
    job_stale_s: float = 60.0  # a queued or running job whose process stopped beating this long is marked failed
    job_retention_s: float = 7 * 86400.0  # finished jobs and cached results older than this are deleted
    # Trainer adapters
    openrlhf_task: str | None = None  # the task of OpenRLHF samples whose label names none (reference or JSON)
    openrlhf_timeout_s: float = 170.0  # under OpenRLHF's 180 s per call; past it 504, and a retry continues
    # HTTP
    token: str | None = None
    max_body_bytes: int = 8 * 2**20
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        servers = self.model_servers
        if isinstance(servers, str):
            servers = tuple(s.strip() for s in servers.split(",") if s.strip())
        object.__setattr__(self, "model_servers", tuple(servers))
        if not self.model_servers:
            raise ConfigError("model_servers is empty: set MODEL_SERVERS or GPU_PORTS to at least one model server")
        for url in self.model_servers:
            parsed = urllib.parse.urlparse(url)
            if parsed.scheme not in ("ws", "wss") or not parsed.hostname or not parsed.port:
                raise ConfigError(f"model server {url!r} must look like ws://host:port")
        for name, low, high in (
            ("connections_per_server", 0, 1024),
            ("max_connections_per_server", 1, 4096),
            ("retries", 0, 10),
            ("max_workers_cap", 1, 4096),
            ("max_inflight_tasks", 1, 10_000_000),
            ("max_concurrent_jobs", 1, 1024),
            ("max_env_steps_per_request", 1, 10**12),
            ("libero_processes", 1, 256),
            ("ray_num_cpus", 0, 1_000_000),
            ("ray_max_retries", 0, 100),
            ("max_simulations_per_request", 1, 10**12),
            ("max_responses", 1, 1_000_000),
            ("max_episodes_per_task", 1, 1_000_000),
            ("max_steps_per_episode", 1, 100_000_000),
            ("default_episodes", 1, 1_000_000),
            ("default_seed", 0, 2**31 - 1),
            ("max_body_bytes", 1024, 2**31),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ConfigError(f"{name} must be an integer between {low} and {high}, got {value!r}")
        if self.connections_per_server > self.max_connections_per_server:
            raise ConfigError("connections_per_server cannot exceed max_connections_per_server")
        for name in ("acquire_timeout_s", "request_timeout_s", "connect_timeout_s", "health_interval_s",
                     "probe_interval_s", "backoff_initial_s", "backoff_max_s", "max_request_seconds",
                     "max_job_seconds", "job_stale_s", "job_retention_s", "openrlhf_timeout_s",
                     "membership_interval_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.job_stale_s < 10:
            raise ConfigError(f"job_stale_s must be at least 10 (jobs beat every 2 s), got {self.job_stale_s!r}")
        if self.job_store not in ("sqlite", "redis", "memory"):
            raise ConfigError(f"job_store must be 'sqlite', 'redis' or 'memory', got {self.job_store!r}")
        if self.libero_execution not in ("process", "thread"):
            raise ConfigError(f"libero_execution must be 'process' or 'thread', got {self.libero_execution!r}")
        if self.execution not in ("local", "ray"):
            raise ConfigError(f"execution must be 'local' or 'ray', got {self.execution!r}")
        if not isinstance(self.ray_address, str):
            raise ConfigError(f"ray_address must be a string ('', 'auto' or host:port), got {self.ray_address!r}")
        cpus = self.ray_task_cpus
        if not isinstance(cpus, (int, float)) or isinstance(cpus, bool) or not 0 < cpus <= 1024:
            raise ConfigError(f"ray_task_cpus must be a number of CPUs in (0, 1024], got {cpus!r}")
        if not isinstance(self.failure_score, (int, float)) or isinstance(self.failure_score, bool):
            raise ConfigError(f"failure_score must be a number, got {self.failure_score!r}")
        if self.token is not None and (not isinstance(self.token, str) or len(self.token) < 8):
            raise ConfigError("token must be a string of at least 8 characters (or unset)")
        if str(self.log_level).upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level {self.log_level!r} must be DEBUG, INFO, WARNING or ERROR")


FIELDS = {f.name: f for f in dataclasses.fields(AppConfig)}


def _coerce(name: str, text: str) -> Any:
    """An environment string to the field's type."""
    default = FIELDS[name].default
    if name == "model_servers":
        return text
    if name in ("token", "model_api_key"):
        return text or None
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes")
    try:
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise ConfigError(f"environment variable REWARD_{name.upper()}={text!r} is not a number") from None
    return text


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in FIELDS:
        key = f"REWARD_{name.upper()}"
        if key in environ:
            values[name] = _coerce(name, environ[key])
    if environ.get("GPU_PORTS"):
        host = environ.get("MODEL_HOST", "127.0.0.1")
        ports = [p.strip() for p in environ["GPU_PORTS"].split(",") if p.strip()]
        if not all(p.isascii() and p.isdigit() for p in ports):
            raise ConfigError(f"GPU_PORTS={environ['GPU_PORTS']!r} must be a comma-separated list of ports")
        values["model_servers"] = tuple(f"ws://{host}:{p}" for p in ports)
    if environ.get("MODEL_SERVERS"):
        values["model_servers"] = environ["MODEL_SERVERS"]
    if "REWARD_SERVER_TOKEN" in environ:
        values["token"] = environ["REWARD_SERVER_TOKEN"] or None
    if "MODEL_SERVER_API_KEY" in environ:
        values["model_api_key"] = environ["MODEL_SERVER_API_KEY"] or None
    return values


def load_config(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> AppConfig:
    """Defaults, then ``REWARD_CONFIG`` (a file), then the environment, then ``overrides``."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if environ.get("REWARD_CONFIG"):
        values.update(read_config_table(environ["REWARD_CONFIG"]))
    values.update(from_env(environ))
    values.update(overrides or {})
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown reward app option(s) {unknown}; known: {sorted(FIELDS)}")
    return AppConfig(**values)
