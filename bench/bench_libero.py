"""LIBERO environment cost: step time with and without rendering, episodes per hour per core,
and thread against process execution.

    python bench/bench_libero.py [--steps 20]

Needs the 'libero' extra (scripts/install_libero.sh). Uses libero_spatial task 0 at openpi's
256x256 resolution with both cameras. Thread vs process: two workers, each with its own
environment built inside it, step in parallel; aggregate steps per second. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchlib import write_results  # noqa: E402
from pi0_reward_server.kinds import libero as libero_backend  # noqa: E402

SUITE, TASK_ID = "libero_spatial", 0


def build(render: bool):
    task, init_states, bddl = libero_backend.load_task(SUITE, TASK_ID)
    started = time.perf_counter()
    if render:
        env = libero_backend.make_env(bddl, seed=7)
    else:
        from libero.libero.envs.env_wrapper import ControlEnv

        env = ControlEnv(bddl_file_name=bddl, use_camera_obs=False, has_offscreen_renderer=False)
        env.seed(7)
    build_s = time.perf_counter() - started
    env.reset()
    env.set_init_state(init_states[0])
    return env, build_s


def step_time(env, steps: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    for _ in range(3):
        env.step(libero_backend.DUMMY_ACTION)
    started = time.perf_counter()
    for _ in range(steps):
        env.step(rng.uniform(-1, 1, 7).tolist())
    return (time.perf_counter() - started) / steps


def worker(steps: int, seed: int, barrier, results) -> None:
    """Build an environment here (GL contexts belong to their thread or process), wait for the
    other workers, then step: the timed parts overlap."""
    libero_backend.render_check()
    env, _ = build(render=True)
    try:
        barrier.wait()
        results.put(1.0 / step_time(env, steps, seed))
    finally:
        env.close()


def parallel(kind: str, workers: int, steps: int) -> float:
    """Aggregate steps/s of ``workers`` environments stepping at the same time."""
    import queue
    import threading

    if kind == "thread":
        barrier, results = threading.Barrier(workers), queue.Queue()
        runners = [threading.Thread(target=worker, args=(steps, i, barrier, results)) for i in range(workers)]
    else:
        ctx = multiprocessing.get_context("spawn")
        barrier, results = ctx.Barrier(workers), ctx.Queue()
        runners = [ctx.Process(target=worker, args=(steps, i, barrier, results)) for i in range(workers)]
    for runner in runners:
        runner.start()
    rates = [results.get(timeout=600) for _ in runners]
    for runner in runners:
        runner.join(60)
    return float(sum(rates))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "libero_cpu.json"))
    args = parser.parse_args()
    backend = libero_backend.render_check()
    results: dict = {"suite": SUITE, "task_id": TASK_ID, "resolution": libero_backend.ENV_RESOLUTION,
                     "mujoco_gl": backend, "cpu_cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    env, build_s = build(render=True)
    results["build_seconds_render"] = build_s
    results["step_ms_render"] = step_time(env, args.steps) * 1000
    env.close()
    env, build_s = build(render=False)
    results["build_seconds_no_render"] = build_s
    results["step_ms_no_render"] = step_time(env, args.steps * 5) * 1000
    env.close()
    episode_steps = libero_backend.SUITES[SUITE][1] + libero_backend.SETTLE_STEPS
    one = 3600 / (episode_steps * results["step_ms_render"] / 1000)
    results["episode_steps"] = episode_steps
    results["episodes_per_hour_one_process"] = one
    results["thread_2_steps_per_s"] = parallel("thread", 2, args.steps)
    results["process_2_steps_per_s"] = parallel("process", 2, args.steps)
    results["single_steps_per_s"] = 1000 / results["step_ms_render"]
    results["episodes_per_hour_per_core"] = results["process_2_steps_per_s"] * 3600 / episode_steps / (os.cpu_count() or 1)

    print(f"\nLIBERO {SUITE} task {TASK_ID}, {libero_backend.ENV_RESOLUTION}x{libero_backend.ENV_RESOLUTION}, "
          f"MUJOCO_GL={backend}, {os.cpu_count()} cores\n")
    print(f"  build env (cameras)        {results['build_seconds_render']:7.1f} s")
    print(f"  step with rendering        {results['step_ms_render']:7.1f} ms")
    print(f"  step without rendering     {results['step_ms_no_render']:7.1f} ms")
    print(f"  1 worker                   {results['single_steps_per_s']:7.2f} steps/s  "
          f"({one:.0f} episodes/hour of {episode_steps} steps)")
    print(f"  2 threads                  {results['thread_2_steps_per_s']:7.2f} steps/s")
    print(f"  2 processes (spawn)        {results['process_2_steps_per_s']:7.2f} steps/s")
    print(f"  episodes/hour per core     {results['episodes_per_hour_per_core']:7.1f} (processes)")
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
