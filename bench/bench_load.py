"""A bounded load test: C concurrent clients for T seconds against /score and against a gpu_worker.

    python bench/bench_load.py [--clients 8] [--seconds 30] [--warmup 5]

Starts two CPU model servers (shipped CartPole policy) and the reward app
under gunicorn, all on loopback. Each phase warms up, reads the resident
memory (RSS) of the processes under load, runs C clients in a closed loop for
T seconds, and reads RSS again. Reports requests, errors (target 0), p50/p99
latency, and RSS growth after warm-up (target: under 10%). Every loop is
bounded in count and time, and everything it started is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchlib import start_reward_app, write_results  # noqa: E402
from gpu_worker.client import ModelClient  # noqa: E402
from gpu_worker.config import ModelConfig, ServerConfig  # noqa: E402
from gpu_worker.launch import start_server_process  # noqa: E402

MAX_REQUESTS_PER_CLIENT = 1_000_000  # a hard bound besides the clock


def rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    out = []
    for status in pathlib.Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        match = re.search(r"^PPid:\s+(\d+)$", text, re.MULTILINE)
        if match and int(match.group(1)) == pid:
            out.append(int(status.parent.name))
    return out


def closed_loop(call, clients: int, seconds: float) -> dict:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[list[str]] = [[] for _ in range(clients)]
    stop_at = time.monotonic() + seconds

    def worker(i: int) -> None:
        state = call(i, None)  # per-client setup (a connection, say)
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if time.monotonic() >= stop_at:
                break
            t0 = time.perf_counter()
            try:
                call(i, state)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors[i].append(f"{type(exc).__name__}: {exc}"[:200])
            latencies[i].append((time.perf_counter() - t0) * 1000)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    flat = [x for per in latencies for x in per]
    errs = [e for per in errors for e in per]
    return {"requests": len(flat), "errors": len(errs), "first_errors": errs[:5], "seconds": elapsed,
            "requests_per_s": len(flat) / elapsed, "p50_ms": float(np.percentile(flat, 50)) if flat else None,
            "p99_ms": float(np.percentile(flat, 99)) if flat else None}


def phase(name: str, call, pids: list[int], clients: int, seconds: float, warmup: float) -> dict:
    closed_loop(call, clients, warmup)
    before = {pid: rss_mb(pid) for pid in pids}
    result = closed_loop(call, clients, seconds)
    after = {pid: rss_mb(pid) for pid in pids}
    total_before, total_after = sum(before.values()), sum(after.values())
    result.update({
        "name": name, "clients": clients,
        "rss_mb_start": round(total_before, 1), "rss_mb_end": round(total_after, 1),
        "rss_growth_pct": round((total_after - total_before) / total_before * 100, 2),
    })
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "load_cpu.json"))
    args = parser.parse_args()
    if not (1 <= args.clients <= 256 and 0 < args.seconds <= 600):
        parser.error("--clients must be 1-256 and --seconds 0-600")

    cartpole = ModelConfig.parse("cartpole=gpu_worker.models.cartpole:CartPolePolicy")
    threads = str(max(1, (os.cpu_count() or 2) // 2))
    servers = [start_server_process(ServerConfig(port=0, models=(cartpole,), log_level="WARNING"),
                                    env={"OMP_NUM_THREADS": threads}) for _ in range(2)]
    app, base = start_reward_app([s.url for s in servers], threads=max(8, args.clients))
    results: dict = {"date": time.strftime("%Y-%m-%d"), "cpu_cores": os.cpu_count(), "phases": []}
    try:
        body = json.dumps({"responses": [{"task": "cartpole", "max_steps": 20, "success_threshold": 20}],
                           "reward_function_kwargs": {"episodes": 2}}).encode()

        def score(i: int, state):
            if state is None:
                return True
            request = urllib.request.Request(f"{base}/score", data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                reply = json.loads(response.read())
            if reply["failures"]:
                raise RuntimeError(reply["details"][0]["error"])

        app_pids = [app.pid, *children(app.pid)]
        results["phases"].append(phase("/score (gunicorn app + 2 model servers)", score,
                                       app_pids + [s.process.pid for s in servers], args.clients, args.seconds,
                                       args.warmup))

        obs = {"observation/state": np.zeros(4, np.float32)}
        clients = [ModelClient(servers[0].url) for _ in range(args.clients)]

        def infer(i: int, state):
            if state is None:
                return True
            clients[i].infer(obs)

        results["phases"].append(phase("gpu_worker direct", infer, [servers[0].process.pid], args.clients,
                                       args.seconds, args.warmup))
        for c in clients:
            c.close()
    finally:
        app.terminate()
        app.wait(60)
        for s in servers:
            s.stop()

    print(f"\nLoad: {args.clients} closed-loop clients, {args.seconds:g}s per phase after {args.warmup:g}s warm-up\n")
    print("  phase                                       requests  errors    req/s   p50 ms   p99 ms  RSS MB start->end (growth)")
    for p in results["phases"]:
        print(f"  {p['name']:<42} {p['requests']:9d} {p['errors']:7d} {p['requests_per_s']:8.1f} {p['p50_ms']:8.2f} "
              f"{p['p99_ms']:8.2f}  {p['rss_mb_start']:.0f} -> {p['rss_mb_end']:.0f} ({p['rss_growth_pct']:+.1f}%)")
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
