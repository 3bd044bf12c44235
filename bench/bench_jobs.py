"""Benchmark jobs and the result store: what the store adds per task, jobs per second, cached answers.

    python bench/bench_jobs.py [--tasks 64] [--jobs 64] [--repeats 5] [--out bench/results/jobs_cpu.json]

One gpu_worker (the shipped CartPole policy) and the reward app under gunicorn
run in their own processes; the app is started once per store (``memory``,
the in-process baseline; ``sqlite``, the default; ``redis``, on a local
``redis-server`` started here when one is installed), and in one run:

1. ``POST /score`` of N one-step CartPole tasks with ``"cache": false``: wall
   time per task with each store, repeated and alternated; the store's
   overhead per task is the median paired difference against ``memory``;
2. jobs per second: M single-task jobs submitted with ``POST /jobs`` as fast as
   one client can, then followed to their end with ``GET /jobs/<id>``;
3. a cached answer: the same /score again with the cache on, per task.

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_score import CARTPOLE, post_score, short_task  # noqa: E402
from benchlib import start_reward_app, write_results  # noqa: E402

from gpu_worker.config import ServerConfig  # noqa: E402
from gpu_worker.launch import start_server_process  # noqa: E402

STORES = ("memory", "sqlite", "redis")


def call(base: str, method: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def start_redis(workdir: str) -> tuple[subprocess.Popen | None, str]:
    """A throwaway redis-server on a free loopback port, or (None, "") where none is installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        print("redis-server is not installed: the redis store is left out (scripts/install_redis.sh)")
        return None, ""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    import redis

    for _ in range(200):
        try:
            redis.Redis(port=port).ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def jobs_per_second(base: str, n: int) -> float:
    started = time.perf_counter()
    ids = [call(base, "POST", "/jobs", {"responses": [short_task(i, 1)],
                                        "reward_function_kwargs": {"cache": False}})["id"] for i in range(n)]
    for job_id in ids:
        while call(base, "GET", f"/jobs/{job_id}")["state"] not in ("done", "failed", "cancelled"):
            time.sleep(0.005)
    return n / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "jobs_cpu.json"))
    args = parser.parse_args()
    server = start_server_process(ServerConfig(port=0, models=(CARTPOLE,), log_level="WARNING"))
    scratch = tempfile.TemporaryDirectory()
    apps = {}
    redis_proc, redis_url = start_redis(scratch.name)
    stores = [s for s in STORES if s != "redis" or redis_url]
    try:
        for store in stores:
            apps[store] = start_reward_app([server.url], env={"REWARD_JOB_STORE": store, "REWARD_REDIS_URL": redis_url,
                                                              "REWARD_DATA_DIR": f"{scratch.name}/{store}"})
        responses = [short_task(i, 1) for i in range(args.tasks)]
        per_task: dict[str, list[float]] = {store: [] for store in stores}
        for _ in range(args.repeats + 1):  # the first round warms up and is dropped
            for store in stores:
                seconds, result = post_score(apps[store][1], responses, {"cache": False, "max_workers": 4})
                assert result["failures"] == 0, result
                per_task[store].append(seconds / args.tasks * 1000)
        per_task = {store: times[1:] for store, times in per_task.items()}
        overhead = {store: statistics.median(a - b for a, b in zip(per_task[store], per_task["memory"]))
                    for store in stores}
        results: dict = {"date": time.strftime("%Y-%m-%d"), "tasks_per_request": args.tasks,
                         "repeats": args.repeats, "stores": {}}
        for store in stores:
            base = apps[store][1]
            post_score(base, responses, {"max_workers": 4})  # fill the cache
            seconds, cached = post_score(base, responses, {"max_workers": 4})
            assert cached["cached"] == args.tasks, cached["cached"]
            results["stores"][store] = {
                "score_ms_per_task": statistics.median(per_task[store]),
                "store_overhead_ms_per_task_vs_memory": overhead[store],
                "jobs_per_s": jobs_per_second(base, args.jobs),
                "cached_ms_per_task": seconds / args.tasks * 1000,
            }
    finally:
        for proc, _ in apps.values():
            proc.terminate()
            proc.wait(30)
        server.stop()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        scratch.cleanup()
    print(f"\nJobs and the result store ({args.tasks} one-step CartPole tasks per /score, median of {args.repeats})\n")
    print("  store  | /score ms per task | added per task vs memory | jobs/s (1 task each) | cached ms per task")
    for store, row in results["stores"].items():
        print(f"  {store:<6} | {row['score_ms_per_task']:18.3f} | {row['store_overhead_ms_per_task_vs_memory']:24.3f} | "
              f"{row['jobs_per_s']:20.1f} | {row['cached_ms_per_task']:18.3f}")
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
