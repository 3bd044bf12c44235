"""Benchmark POST /score: throughput for short tasks, and the reward layer's own cost per task.

    python bench/bench_score.py [--tasks 64] [--repeats 3] [--out bench/results/score_cpu.json]

Model servers (gpu_worker hosting the shipped CartPole policy) and the reward
app (gunicorn, gthread) run in their own processes. Measured in one run:

1. /score throughput (tasks/s) for N short CartPole tasks with max_workers
   1, 2, 4, 8 against one and against two model servers;
2. the reward layer's own cost per task: the /score wall time minus the wall
   time of running the same tasks in this process through a client pool on
   the same servers with the same max_workers (no HTTP, no Flask), divided by
   the number of tasks. Measured on one-step tasks, so the rollouts' own cost
   (and its noise) is small next to what is measured; the two runs alternate
   and the median of the paired differences is reported.

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchlib import start_reward_app, write_results  # noqa: E402
from gpu_worker.config import ModelConfig, ServerConfig  # noqa: E402
from gpu_worker.launch import start_server_process  # noqa: E402
from pi0_reward_server.client_pool import ClientPool  # noqa: E402
from pi0_reward_server.kinds.registry import run_tasks  # noqa: E402
from pi0_reward_server.policies import PoolPolicy  # noqa: E402
from pi0_reward_server.kinds.registry import Limits, parse_task  # noqa: E402

CARTPOLE = ModelConfig.parse("cartpole=gpu_worker.models.cartpole:CartPolePolicy")


def short_task(i: int, steps: int) -> dict:
    return {"task": "cartpole", "max_steps": steps, "episodes": 1, "seed": i, "success_threshold": steps}


def post_score(base: str, responses: list, kwargs: dict) -> tuple[float, dict]:
    body = json.dumps({"responses": responses, "reward_function_kwargs": kwargs}).encode()
    request = urllib.request.Request(f"{base}/score", data=body, headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        result = json.loads(response.read())
    return time.perf_counter() - started, result


def in_process(urls: list[str], responses: list, max_workers: int) -> tuple[float, list[float]]:
    tasks = [parse_task(i, r, {}, Limits()) for i, r in enumerate(responses)]
    with ClientPool(urls, connections_per_server=2).start(wait_s=10) as pool:
        pool.wait_for_servers(len(urls), 10)
        started = time.perf_counter()
        results = run_tasks(tasks, lambda model: PoolPolicy(pool, model), max_workers=max_workers, failure_score=0.0)
        return time.perf_counter() - started, [r.score for r in results]


def layer_cost(base: str, urls: list[str], n_tasks: int, repeats: int, max_workers: int = 4) -> dict:
    responses = [short_task(i, 1) for i in range(n_tasks)]
    diffs = []
    for _ in range(repeats):
        http_s, body = post_score(base, responses, {"max_workers": max_workers})
        local_s, scores = in_process(urls, responses, max_workers)
        assert scores == body["scores"]
        diffs.append((http_s - local_s) * 1000 / n_tasks)
    return {"tasks": n_tasks, "max_workers": max_workers, "repeats": repeats,
            "ms_per_task_median": statistics.median(diffs), "ms_per_task_min": min(diffs),
            "ms_per_task_max": max(diffs), "paired_ms_per_task": diffs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=64, help="tasks per /score request")
    parser.add_argument("--steps", type=int, default=20, help="env steps per task (one episode)")
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs per point")
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument("--layer-tasks", type=int, default=128, help="one-step tasks per request for the layer cost")
    parser.add_argument("--layer-repeats", type=int, default=9)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "score_cpu.json"))
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    responses = [short_task(i, args.steps) for i in range(args.tasks)]
    # Two CPU servers share the cores: give each its share of threads, as start_pi0_models.sh does,
    # or their OpenMP pools spin against each other.
    threads = str(max(1, (os.cpu_count() or 2) // 2))
    servers = [start_server_process(ServerConfig(port=0, models=(CARTPOLE,), log_level="WARNING"),
                                    env={"OMP_NUM_THREADS": threads}) for _ in range(2)]
    urls = [s.url for s in servers]
    results: dict = {"tasks_per_request": args.tasks, "steps_per_task": args.steps, "repeats": args.repeats,
                     "cpu_cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "points": []}
    try:
        for n_servers in (1, 2):
            app, base = start_reward_app(urls[:n_servers])
            try:
                post_score(base, responses[:4], {"max_workers": 1})  # warm
                for w in workers:
                    http_times, local_times = [], []
                    for _ in range(args.repeats):
                        seconds, body = post_score(base, responses, {"max_workers": w})
                        assert body["failures"] == 0, body
                        http_times.append(seconds)
                        local, scores = in_process(urls[:n_servers], responses, w)
                        assert scores == body["scores"]
                        local_times.append(local)
                    http_s, local_s = statistics.median(http_times), statistics.median(local_times)
                    results["points"].append({
                        "model_servers": n_servers, "max_workers": w,
                        "score_seconds": http_s, "tasks_per_s": args.tasks / http_s,
                        "in_process_seconds": local_s,
                    })
                if n_servers == 2:
                    results["layer"] = layer_cost(base, urls, args.layer_tasks, args.layer_repeats)
            finally:
                app.terminate()
                app.wait(60)
    finally:
        for server in servers:
            server.stop()

    print(f"\n/score with {args.tasks} CartPole tasks of {args.steps} steps each "
          f"(median of {args.repeats}; {os.cpu_count()} cores shared by everything)\n")
    print("  servers  max_workers |  /score s  tasks/s | same tasks in-process through the pool, s")
    for p in results["points"]:
        print(f"  {p['model_servers']:>7}  {p['max_workers']:>11} | {p['score_seconds']:8.3f} {p['tasks_per_s']:8.1f} | "
              f"{p['in_process_seconds']:8.3f}")
    layer = results["layer"]
    print(f"\nReward layer's own cost ({layer['tasks']} one-step tasks, 2 servers, max_workers {layer['max_workers']}, "
          f"{layer['repeats']} paired runs): {layer['ms_per_task_median']:.3f} ms/task "
          f"(paired differences {layer['ms_per_task_min']:.3f} to {layer['ms_per_task_max']:.3f})")
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
