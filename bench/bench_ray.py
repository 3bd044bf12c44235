"""Rollouts on Ray against the local modes on one box: tasks per second and what Ray adds per task.

    python bench/bench_ray.py [--gym-tasks 16] [--libero-tasks 4] [--cpus 1 2] [--out bench/results/ray_cpu.json]

One gpu_worker (the shipped CartPole policy and the tiny LIBERO policy) runs in its own process. For
each CPU count N:

* gym (CartPole, 2 episodes of up to 100 steps per task): the local mode (``N`` threads, what
  ``execution = "local"`` runs gym tasks on) against ``execution = "ray"`` on a local Ray with N CPUs;
* LIBERO (libero_spatial task 0, one episode of ``--libero-steps`` policy steps per task): the process
  mode (``N`` spawned workers, ``libero_execution = "process"``) against Ray with N CPUs;
* every mode runs the batch once to warm up (workers started, environments built) and is timed on
  the second run, as a long-lived app would be.

The overhead per task is the per-task time of one-step CartPole tasks run one at a time, Ray minus
threads. The cluster estimate scales the measured LIBERO rate per core to 8 nodes x 32 cores with the
assumptions written beside it in the JSON. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from benchlib import write_results  # noqa: E402

from gpu_worker.config import ModelConfig, ServerConfig  # noqa: E402
from gpu_worker.launch import start_server_process  # noqa: E402
from pi0_reward_server.kinds.base import Limits  # noqa: E402
from pi0_reward_server.kinds.registry import parse_task, run_tasks  # noqa: E402

MODELS = (ModelConfig.parse("cartpole=gpu_worker.models.cartpole:CartPolePolicy"),
          ModelConfig.parse("libero_tiny=gpu_worker.models.libero_tiny:LiberoTinyPolicy"))
EPISODE_STEPS = 230  # a LIBERO episode as bench_libero.py counts it (settle steps plus policy steps)


def gym_tasks(n: int, *, episodes: int = 2, max_steps: int = 100) -> list:
    return [parse_task(i, {"task": "cartpole_short", "seed": i, "episodes": episodes, "max_steps": max_steps},
                       {}, Limits()) for i in range(n)]


def libero_tasks(n: int, steps: int) -> list:
    return [parse_task(i, {"kind": "libero", "suite": "libero_spatial", "task_id": 0, "episodes": 1,
                           "max_steps": steps, "model": "libero_tiny", "seed": i}, {}, Limits()) for i in range(n)]


def timed(run, tasks: list) -> tuple[float, list]:
    run(tasks)  # warm-up: workers started, environments built, connections open
    started = time.perf_counter()
    results = run(tasks)
    seconds = time.perf_counter() - started
    failed = [r.error for r in results if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} task(s) failed, e.g. {failed[0]}")
    return seconds, results


def thread_mode(pool, workers: int):
    from pi0_reward_server.policies import PoolPolicy

    return lambda tasks: run_tasks(tasks, lambda model: PoolPolicy(pool, model), max_workers=workers,
                                   failure_score=0.0)


def process_mode(runner, workers: int):
    def run(tasks):
        deadline = time.monotonic() + 3600
        with concurrent.futures.ThreadPoolExecutor(workers) as executor:
            return list(executor.map(lambda t: runner.run(t, deadline, 3600, 0.0), tasks))

    return run


def ray_mode(runner, workers: int):
    return lambda tasks: runner.run(tasks, workers, time.monotonic() + 3600, None, None)


def per_task_seconds(run, n: int) -> list[float]:
    """Wall time of each of ``n`` one-step tasks run one after another."""
    tasks = gym_tasks(1, episodes=1, max_steps=1)
    run(tasks)
    times = []
    for _ in range(n):
        started = time.perf_counter()
        run(tasks)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gym-tasks", type=int, default=16)
    parser.add_argument("--libero-tasks", type=int, default=4, help="0 skips LIBERO")
    parser.add_argument("--libero-steps", type=int, default=10, help="policy steps per LIBERO episode")
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--overhead-tasks", type=int, default=30)
    parser.add_argument("--out", default=str(ROOT / "bench/results/ray_cpu.json"))
    args = parser.parse_args()
    if args.gym_tasks < 1 or args.libero_tasks < 0 or args.libero_steps < 1 or min(args.cpus) < 1:
        parser.error("--gym-tasks, --libero-steps and --cpus must be at least 1; --libero-tasks at least 0")

    import ray

    from pi0_reward_server.client_pool import ClientPool
    from pi0_reward_server.jobs.processes import ProcessRunner
    from pi0_reward_server.kinds import libero as libero_backend
    from pi0_reward_server.scale.ray_rollouts import RayRunner

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, throwaway instance
    server = start_server_process(ServerConfig(port=0, models=MODELS, log_level="WARNING"))
    urls = [server.url]
    do_libero = args.libero_tasks > 0 and libero_backend.available()
    rows: list[dict] = []
    overhead: dict = {}
    try:
        with ClientPool(urls).start(wait_s=10) as pool:
            for cpus in args.cpus:
                for kind, tasks in (("gym", gym_tasks(args.gym_tasks)),
                                    *((("libero", libero_tasks(args.libero_tasks, args.libero_steps)),)
                                      if do_libero else ())):
                    if kind == "gym":
                        local_name, local = "thread", None
                        seconds, _ = timed(thread_mode(pool, cpus), tasks)
                    else:
                        local_name, local = "process", ProcessRunner(urls, {}, cpus)
                        try:
                            seconds, _ = timed(process_mode(local, cpus), tasks)
                        finally:
                            local.close()
                    rows.append({"kind": kind, "mode": local_name, "cpus": cpus, "tasks": len(tasks),
                                 "seconds": round(seconds, 3), "tasks_per_s": round(len(tasks) / seconds, 3)})
                    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
                    try:
                        runner = RayRunner(urls=lambda: urls, pool_options={}, failure_score=0.0)
                        seconds, results = timed(ray_mode(runner, cpus), tasks)
                        if kind == "gym" and cpus == args.cpus[0]:
                            overhead["ray_s"] = per_task_seconds(ray_mode(runner, 1), args.overhead_tasks)
                            overhead["thread_s"] = per_task_seconds(thread_mode(pool, 1), args.overhead_tasks)
                    finally:
                        ray.shutdown()
                    rows.append({"kind": kind, "mode": "ray", "cpus": cpus, "tasks": len(tasks),
                                 "seconds": round(seconds, 3), "tasks_per_s": round(len(tasks) / seconds, 3)})
                    if kind == "libero":  # Ray reuses its workers: how many timed tasks found their scene built
                        rows[-1]["env_reused"] = sum(bool(r.extra.get("env_reused")) for r in results)
    finally:
        server.stop()

    ray_ms = statistics.median(overhead["ray_s"]) * 1000
    thread_ms = statistics.median(overhead["thread_s"]) * 1000
    print(f"\n{'kind':8}{'mode':10}{'cpus':>5}{'tasks':>7}{'seconds':>10}{'tasks/s':>10}")
    for row in rows:
        reused = f"   environment reused by {row['env_reused']}" if "env_reused" in row else ""
        print(f"{row['kind']:8}{row['mode']:10}{row['cpus']:>5}{row['tasks']:>7}{row['seconds']:>10.2f}"
              f"{row['tasks_per_s']:>10.3f}{reused}")
    print(f"\none-step task, one at a time: ray {ray_ms:.1f} ms, thread {thread_ms:.1f} ms; "
          f"Ray adds {ray_ms - thread_ms:.1f} ms per task")

    def rate(kind: str, mode: str, cpus: int) -> float | None:
        found = [r["tasks_per_s"] for r in rows if (r["kind"], r["mode"], r["cpus"]) == (kind, mode, cpus)]
        return found[0] if found else None

    top = max(args.cpus)
    libero_ratio = (rate("libero", "ray", top) / rate("libero", "process", top)) if do_libero else None
    per_core = 38.06  # episodes per hour per core, bench/results/libero_cpu.json (software rendering, this box)
    nodes, cores = 8, 32
    reserved = 2  # per node: Ray's raylet/object store and the node's share of app and model server clients
    efficiency = min(1.0, libero_ratio) if libero_ratio else 1.0
    estimate = nodes * (cores - reserved) * per_core * efficiency
    print(f"\n8 nodes x 32 cores: about {estimate:,.0f} LIBERO episodes per hour "
          f"({per_core} per core x {nodes * (cores - reserved)} rollout cores x {efficiency:.2f} Ray/process)")
    write_results(args.out, {
        "machine": f"{os.cpu_count()} CPU cores, no GPU; the box was shared with other work while this ran, "
                   "so absolute rates are low and noisy: compare modes within one run",
        "date": time.strftime("%Y-%m-%d"),
        "ray_version": ray.__version__,
        "gym_task": "cartpole_short, 2 episodes, at most 100 steps, shipped CartPole policy",
        "libero_task": (f"libero_spatial task 0, 1 episode, {args.libero_steps} policy steps after the settle steps, "
                        "libero_tiny policy" if do_libero else "skipped (libero extra not installed)"),
        "rows": rows,
        "overhead_per_task_ms": {"ray_median": round(ray_ms, 2), "thread_median": round(thread_ms, 2),
                                 "ray_added": round(ray_ms - thread_ms, 2), "samples": args.overhead_tasks},
        "cluster_estimate": {
            "nodes": nodes, "cores_per_node": cores, "episodes_per_hour": round(estimate),
            "assumptions": [
                f"{per_core} LIBERO episodes per hour per core ({EPISODE_STEPS}-step episodes, software rendering, "
                "bench/results/libero_cpu.json); rendering with EGL on a GPU node is faster",
                f"{reserved} cores per node kept for Ray's own processes and the app/model-server clients; "
                "the app and the model servers run on GPU nodes or a head node outside these 256 cores",
                "the model servers keep up: a pi0-class policy answers ~230 steps per episode within the "
                "simulation's own step time (batched across episodes on each GPU)",
                f"Ray's efficiency against the process mode as measured here at {top} CPUs: "
                f"{efficiency:.2f} (capped at 1)",
                "one environment per rollout worker, reused across tasks of the same scene",
            ],
        },
    })


if __name__ == "__main__":
    main()
