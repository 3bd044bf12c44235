"""The paths a serving change must not slow, at two trees of the code, side by side in one run.

    python bench/bench_paths.py --base-tree <copy of an older commit> [--head-tree .] [--rounds 3]

For each tree (the rounds alternate, so drift on a shared machine falls on both), that tree's
gpu_worker serves the shipped CartPole and LIBERO-shaped models on CPU, and this process measures:

- one client sending LIBERO-sized frames (two 224x224x3 images, state, prompt): p50 ms and the
  server's CPU ms per request;
- explicit batch frames: 64 CartPole rows and 8 LIBERO-sized rows per frame, p50 ms and CPU ms;
- the reward layer's CartPole tasks (64 tasks of 20 steps, ``run_tasks`` through a client pool of
  this tree, the median of 3) with 1 and 4 workers, in tasks/s.

Prints a table and writes JSON (``bench/results/paths_cpu.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_gpu_worker import libero_obs, pct, state_obs  # noqa: E402
from bench_score import in_process, short_task  # noqa: E402
from benchlib import write_results  # noqa: E402
from gpu_worker.client import ModelClient  # noqa: E402

MODELS = ("cartpole=gpu_worker.models.cartpole:CartPolePolicy", "libero_tiny=gpu_worker.models.libero_tiny:LiberoTinyPolicy")


def start(tree: pathlib.Path) -> tuple[subprocess.Popen, str]:
    """That tree's gpu_worker, in its own process with the tree first on its path."""
    args = [sys.executable, "-m", "gpu_worker", "--port", "0", "--device", "cpu", "--log-level", "INFO"]
    for model in MODELS:
        args += ["--model", model]
    proc = subprocess.Popen(args, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = None
    for line in proc.stdout:
        match = re.search(r"listening on (ws://\S+)", line)
        url = match.group(1) if match else url
        if url and " ready: " in line:  # models loaded: it accepts connections now
            subprocess.Popen(["cat"], stdin=proc.stdout, stdout=subprocess.DEVNULL)  # keep its log pipe drained
            return proc, url
    proc.kill()
    raise RuntimeError(f"gpu_worker from {tree} did not start")


def cpu_s(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def frames(url: str, pid: int, frame, n: int, batch: bool) -> dict:
    with ModelClient(url) as client:
        call = client.infer_batch if batch else client.infer
        for _ in range(max(10, n // 10)):
            call(frame)
        times, before = [], cpu_s(pid)
        for _ in range(n):
            t0 = time.perf_counter()
            call(frame)
            times.append((time.perf_counter() - t0) * 1000)
        return {"p50_ms": pct(times, 50), "cpu_ms_per_request": (cpu_s(pid) - before) / n * 1000}


def measure(tree: pathlib.Path, n: int) -> dict:
    proc, url = start(tree)
    try:
        libero = {**libero_obs(), "__model__": "libero_tiny"}
        out = {"libero_1_client": frames(url, proc.pid, libero, n, batch=False),
               "batch_64_cartpole": frames(url, proc.pid, [{**state_obs(), "__model__": "cartpole"}] * 64, n, True),
               "batch_8_libero": frames(url, proc.pid, [libero] * 8, n // 2, True)}
        responses = [short_task(i, 20) for i in range(64)]
        for workers in (1, 4):
            in_process([url], responses, workers)
            rates = [64 / in_process([url], responses, workers)[0] for _ in range(3)]
            out[f"tasks_per_s_{workers}_workers"] = statistics.median(rates)
        return out
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-tree", required=True, help="a copy of the older code (its gpu_worker package)")
    parser.add_argument("--head-tree", default=str(ROOT))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "paths_cpu.json"))
    args = parser.parse_args()
    trees = {"base": pathlib.Path(args.base_tree).resolve(), "head": pathlib.Path(args.head_tree).resolve()}
    for label, tree in trees.items():
        if not (tree / "gpu_worker" / "__main__.py").is_file():
            parser.error(f"--{label}-tree: no gpu_worker package in {tree}")
    runs: dict[str, list] = {label: [] for label in trees}
    for _ in range(args.rounds):
        for label, tree in trees.items():
            runs[label].append(measure(tree, args.requests))
    print(f"\nPer round, base {trees['base'].name} / head {trees['head'].name} (p50 ms [server CPU ms]; tasks/s)")
    for key in runs["base"][0]:
        cells = []
        for label in trees:
            values = [r[key] for r in runs[label]]
            cells.append(" / ".join(f"{v:.1f}" if isinstance(v, float) else f"{v['p50_ms']:.2f} [{v['cpu_ms_per_request']:.2f}]"
                                    for v in values))
        print(f"  {key:24s} base {cells[0]:40s} head {cells[1]}")
    write_results(args.out, {"trees": {k: str(v.name) for k, v in trees.items()}, "rounds": args.rounds, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
