"""gunicorn settings for the reward app; every one can be overridden by environment.

    gunicorn -c pi0_reward_server/gunicorn_config.py 'pi0_reward_server.app:create_app()'

* ``preload_app = False``: each worker imports the app and builds its own
  client pool (connections, health thread) after the fork; nothing that holds
  sockets, threads or CUDA state is created in the master.
* gthread workers: ``/score`` waits on model servers; threads let one worker
  serve ``/health`` and ``/pool_status`` while scoring.
* A long timeout (1800 s): a ``/score`` of many long rollouts is legitimately slow.
* The worker is gthread's, refusing new connections with a fast 503 and
  ``Retry-After`` while it drains on SIGTERM (``gunicorn_worker.py``).
* Metrics add up across workers (prometheus-client's multiprocess mode, in
  ``PROMETHEUS_MULTIPROC_DIR``, created empty here and cleaned on exit).
* The access log holds no secret: no user field (gunicorn would decode a Basic
  auth user name), the path without its query string, no referer.
"""

import os


def _int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise SystemExit(f"{name}={value!r} must be a positive integer")
    return int(value)


bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:6006")
worker_class = "pi0_reward_server.gunicorn_worker.DrainingThreadWorker"
workers = _int("GUNICORN_WORKERS", 1)
threads = _int("GUNICORN_THREADS", 16)
timeout = _int("GUNICORN_TIMEOUT", 1800)
graceful_timeout = _int("GUNICORN_GRACEFUL_TIMEOUT", 120)
keepalive = _int("GUNICORN_KEEPALIVE", 5)
preload_app = False
accesslog = os.environ.get("GUNICORN_ACCESSLOG", "-")
# Remote address, time, method, path (%(U)s: no query string, where ?access_token=... would be), protocol,
# status, bytes, seconds. Not gunicorn's default: its %(u)s, %(r)s and %(f)s can carry a token.
access_log_format = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(L)ss'

errorlog = os.environ.get("GUNICORN_ERRORLOG", "-")
loglevel = os.environ.get("GUNICORN_LOGLEVEL", "info")
pidfile = os.environ.get("GUNICORN_PIDFILE") or None
# gunicorn >= 23 opens a control socket at one fixed path per user; two apps on one box
# would fight over it, and nothing here uses it.


# Metrics across workers: prometheus-client's multiprocess mode keeps each worker's values in files in
# one directory, which must exist, empty, before the workers import it. An operator's own directory
# (PROMETHEUS_MULTIPROC_DIR) is emptied at start; otherwise a fresh one is made and removed at exit.
_metrics_dir_is_ours = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _metrics_dir_is_ours:
    import tempfile

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="pi0-reward-metrics-")


def on_starting(server) -> None:
    import pathlib

    folder = pathlib.Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):  # an earlier run's counts are not this run's
        stale.unlink()


def child_exit(server, worker) -> None:
    """A worker that is gone: its live gauges (in-flight tasks, servers up) no longer count."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    if _metrics_dir_is_ours:
        import shutil

        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


def worker_exit(server, worker) -> None:
    """A worker that stops marks the jobs it was running failed with the reason at once (they cannot go on
    without it), instead of leaving them for the stale-job sweep."""
    app = getattr(worker, "wsgi", None)
    runner = getattr(app, "extensions", {}).get("job_runner") if app is not None else None
    if runner is not None:
        runner.close()


control_socket_disable = os.environ.get("GUNICORN_CONTROL_SOCKET", "0") != "1"
