"""Benchmark gpu_worker against a direct in-process call and an openpi-style serial server.

    python bench/bench_gpu_worker.py [--device cpu|cuda] [--duration 3] [--out bench/results/...json]

Measures, in one run so the ratios are side by side:

1. round-trip latency p50/p99 through the server vs a direct in-process call,
   for a state-only observation (CartPole MLP) and a LIBERO-sized one (two
   224x224x3 uint8 images + 8 floats + prompt, LiberoTinyPolicy);
2. throughput at 1, 4, 16, 64 concurrent clients (one connection each,
   lock-step, all driven by one asyncio loop) for a compute-bound model (ComputeMLP), against the direct
   in-process batched forward at the same batch size (the limit) and against
   bench/serial_server.py (inference on the event loop, one request at a time);
3. head-of-line blocking: the state-only latency of one client while other
   clients send large explicit batch frames, with large-frame (de)coding off
   the event loop (the default) and on it.

``--side-by-side`` runs instead the comparison the serving path is judged by: for a small
(64-256-256-8) and a wide (64-2048-2048-8) MLP at 1, 4 and 64 clients, gpu_worker, the serial
openpi-style server, LitServe (the batching server users would otherwise pick; best of a 0 and a
2 ms batch timeout; needs ``pip install litserve``) and the direct forward at batch N, each server
pinned to one CPU and the load generator to another, with each server's CPU time per request.
It also measures the floor under any websockets server in Python (``serial_server.py --echo``: one
fixed reply per request, nothing decoded, no model) and from it the ceiling, the most such a server
could serve on that core: 1 / (1 / direct forward rate + the floor's CPU per request).
It writes ``bench/results/gpu_worker_side_by_side_<device>.json``.

``--batch-wait 0:0,5:0.3,5:0`` compares batching settings (``max_wait_ms:batch_gap_ms``) instead, pinned
the same way, settings alternating over ``--rounds``: lock-step clients at each ``--clients`` level and 8
clients arriving at random (exponential think time, mean 2 ms), with throughput, mean batch and latency
(``bench/results/gpu_worker_batch_wait_<device>.json``).

Servers run in their own processes; the load comes from this one.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from websockets.asyncio.client import connect  # noqa: E402

from gpu_worker import wire  # noqa: E402
from gpu_worker.client import ModelClient  # noqa: E402
from gpu_worker.config import ModelConfig, ServerConfig  # noqa: E402
from gpu_worker.launch import start_server_process  # noqa: E402
from gpu_worker.model import load_model  # noqa: E402

CARTPOLE = "cartpole=gpu_worker.models.cartpole:CartPolePolicy"
LIBERO = "libero_tiny=gpu_worker.models.libero_tiny:LiberoTinyPolicy"
COMPUTE = "compute=gpu_worker.models.compute_mlp:ComputeMLP"


def state_obs() -> dict:
    return {"observation/state": np.random.default_rng(0).normal(size=4).astype(np.float32)}


def libero_obs() -> dict:
    rng = np.random.default_rng(0)
    return {
        "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/state": rng.normal(size=8).astype(np.float32),
        "prompt": "put both the alphabet soup and the tomato sauce in the basket",
    }


def compute_obs() -> dict:
    return {"observation/state": np.random.default_rng(0).normal(size=64).astype(np.float32)}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# -- latency ----------------------------------------------------------------
def server_latency(url: str, obs: dict, n: int, model: str | None = None) -> list[float]:
    frame = {**obs, "__model__": model} if model else obs
    with ModelClient(url) as client:
        for _ in range(max(10, n // 10)):
            client.infer(frame)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            client.infer(frame)
            times.append((time.perf_counter() - t0) * 1000)
    return times


def direct_latency(policy, obs: dict, n: int) -> list[float]:
    def call():
        batch = {k: (np.array([v]) if isinstance(v, str) else np.asarray(v)[None]) for k, v in obs.items()}
        policy.infer_batch(batch)

    for _ in range(max(10, n // 10)):
        call()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1000)
    return times


# -- throughput -------------------------------------------------------------
def load(url: str, obs: dict, clients: int, duration: float) -> dict:
    """``clients`` lock-step connections driven by one asyncio loop (cheaper than threads,
    so the load generator is not what limits the measurement)."""
    frame = wire.packb(obs)

    async def run() -> dict:
        connections = [await connect(url, compression=None, max_size=None) for _ in range(clients)]
        for ws in connections:
            await ws.recv()  # metadata
            await ws.send(frame)
            await ws.recv()  # warm
        latencies: list[float] = []
        batch_sizes: list[int] = []
        stop_at = time.perf_counter() + duration

        async def worker(ws) -> None:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                await ws.send(frame)
                reply = wire.unpackb(await ws.recv())
                latencies.append((time.perf_counter() - t0) * 1000)
                batch_sizes.append(reply.get("server_timing", {}).get("batch_size", 1))

        started = time.perf_counter()
        await asyncio.gather(*(worker(ws) for ws in connections))
        elapsed = time.perf_counter() - started
        for ws in connections:
            await ws.close()
        return {
            "requests_per_s": len(latencies) / elapsed,
            "p50_ms": pct(latencies, 50),
            "p99_ms": pct(latencies, 99),
            "mean_batch": float(np.mean(batch_sizes)) if batch_sizes else 0.0,
        }

    return asyncio.run(run())


def random_load(url: str, obs: dict, clients: int, duration: float, think_s: float) -> dict:
    """Like :func:`load`, but each client waits a random time (exponential, mean ``think_s``) before each
    request: callers that arrive at random, as independent robots or users do, rather than in lock-step."""
    import random

    frame = wire.packb(obs)

    async def run() -> dict:
        connections = [await connect(url, compression=None, max_size=None) for _ in range(clients)]
        for ws in connections:
            await ws.recv()
            await ws.send(frame)
            await ws.recv()
        latencies: list[float] = []
        stop_at = time.perf_counter() + duration

        async def worker(ws, rng: random.Random) -> None:
            while time.perf_counter() < stop_at:
                await asyncio.sleep(rng.expovariate(1 / think_s))
                t0 = time.perf_counter()
                await ws.send(frame)
                await ws.recv()
                latencies.append((time.perf_counter() - t0) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(worker(ws, random.Random(i)) for i, ws in enumerate(connections)))
        elapsed = time.perf_counter() - started
        for ws in connections:
            await ws.close()
        return {"requests_per_s": len(latencies) / elapsed, "p50_ms": pct(latencies, 50),
                "p99_ms": pct(latencies, 99)}

    return asyncio.run(run())


def batch_wait(args, levels: list[int], settings: list[tuple[float, float]]) -> dict:
    """Throughput and batch size per batching setting (max_wait_ms:batch_gap_ms), lock-step clients and
    clients arriving at random, the settings alternating round by round; server and load pinned as in
    --side-by-side."""
    os.sched_setaffinity(0, {args.load_cpu})
    out: dict = {}
    try:
        for round_ in range(args.rounds):
            for name in args.models.split(","):
                width, depth = MODELS[name]
                model = ModelConfig(name="compute", target="gpu_worker.models.compute_mlp:ComputeMLP",
                                    options={"width": width, "depth": depth})
                for wait, gap in settings:
                    server = start_server_process(ServerConfig(port=0, device=args.device, models=(model,),
                                                               log_level="WARNING", max_wait_ms=wait,
                                                               batch_gap_ms=gap), env={"OMP_NUM_THREADS": "1"})
                    os.sched_setaffinity(server.process.pid, {args.server_cpu})
                    try:
                        row = {str(c): load(server.url, compute_obs(), c, args.duration) for c in levels}
                        row["random_8"] = random_load(server.url, compute_obs(), 8, args.duration, 0.002)
                    finally:
                        server.stop()
                    key = f"{wait:g}:{gap:g}"
                    out.setdefault(name, {}).setdefault(key, []).append(row)
                    print(f"  round {round_} {name:5s} max_wait_ms:batch_gap_ms {key:>7s}  " + "  ".join(
                        f"{c}: {row[str(c)]['requests_per_s']:6.0f} ({row[str(c)]['mean_batch']:4.1f})" for c in levels)
                        + f"  random 8: p50 {row['random_8']['p50_ms']:.2f} p99 {row['random_8']['p99_ms']:.2f} ms",
                        flush=True)
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return out


def http_load(url: str, obs: dict, clients: int, duration: float) -> dict:
    """Like :func:`load`, for an HTTP/JSON server (LitServe's ``POST /predict``): ``clients`` keep-alive
    connections, each sending its next request when the last is answered."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    body = json.dumps({k: np.asarray(v).tolist() for k, v in obs.items()}).encode()
    request = (f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length:\s*(\d+)", head)
        reply = await reader.readexactly(int(length.group(1)) if length else 0)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{url} answered {head.splitlines()[0]!r}: {reply[:200]!r}")

    async def run() -> dict:
        connections = [await asyncio.open_connection(host, int(port)) for _ in range(clients)]
        for reader, writer in connections:
            await exchange(reader, writer)
        latencies: list[float] = []
        stop_at = time.perf_counter() + duration

        async def worker(reader, writer) -> None:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                await exchange(reader, writer)
                latencies.append((time.perf_counter() - t0) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(worker(r, w) for r, w in connections))
        elapsed = time.perf_counter() - started
        for _, writer in connections:
            writer.close()
        return {"requests_per_s": len(latencies) / elapsed, "p50_ms": pct(latencies, 50),
                "p99_ms": pct(latencies, 99)}

    return asyncio.run(run())


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and all its descendants."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


def measured(pid: int, run) -> dict:
    """``run()``'s load figures plus the server's CPU time per request (its whole process tree)."""
    before = tree_cpu_s(pid)
    started = time.perf_counter()
    figures = run()
    cpu = tree_cpu_s(pid) - before
    requests = figures["requests_per_s"] * (time.perf_counter() - started)
    figures["server_cpu_us_per_request"] = cpu / max(requests, 1) * 1e6
    return figures


def direct_batched(policy, obs: dict, batch: int, duration: float, device: str) -> float:
    stacked = {k: np.repeat(np.asarray(v)[None], batch, axis=0) for k, v in obs.items()}
    for _ in range(3):
        policy.infer_batch(stacked)
    sync(device)
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < duration:
        policy.infer_batch(stacked)
        n += 1
    sync(device)
    return n * batch / (time.perf_counter() - started)


# -- head-of-line blocking --------------------------------------------------
def stall(url: str, n: int, senders: int, frame_rows: int) -> dict:
    """Latency of small requests while ``senders`` clients stream big batch frames."""
    big = [{**libero_obs(), "__model__": "libero_tiny"} for _ in range(frame_rows)]
    stop = threading.Event()
    sent = [0]

    def sender() -> None:
        with ModelClient(url) as client:
            while not stop.is_set():
                client.infer_batch(big)
                sent[0] += 1

    threads = [threading.Thread(target=sender) for _ in range(senders)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    times = server_latency(url, state_obs(), n)
    stop.set()
    for t in threads:
        t.join()
    return {"p50_ms": pct(times, 50), "p99_ms": pct(times, 99), "big_frames": sent[0],
            "big_frame_mb": round(frame_rows * 2 * 224 * 224 * 3 / 2**20, 2)}


def start_serial(model: str, device: str = "cpu", options: dict | None = None,
                 env: dict | None = None, echo: bool = False) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "serial_server.py"), "--model", model, "--port", "0", "--device", device,
         "--options", json.dumps(options or {}), *(["--echo"] if echo else [])],
        stdout=subprocess.PIPE, text=True, env={**os.environ, **env} if env else None,
    )
    match, line = None, ""
    for line in proc.stdout:  # a model may print while it loads (LeRobot does)
        match = re.search(r"listening on ws://[^:]+:(\d+)$", line.strip())
        if match:
            break
    if not match:
        proc.kill()
        raise RuntimeError(f"serial server did not start: {line!r}")
    return proc, f"ws://127.0.0.1:{match.group(1)}"


def start_litserve(target: str, options: dict, device: str, batch_timeout: float,
                   cpus: set[int] | None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "litserve_server.py"), "--model", f"compute={target}",
         "--options", json.dumps(options), "--device", device, "--batch-timeout", str(batch_timeout)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"} if cpus else None,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,  # its workers inherit it
        start_new_session=True,
    )
    for line in proc.stdout:
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            return proc, match.group(1)
    proc.kill()
    raise RuntimeError("LitServe did not start (pip install litserve)")


def stop_tree(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


MODELS = {"small": (256, 2), "wide": (2048, 2)}  # ComputeMLP (width, depth): 64-256-256-8 and 64-2048-2048-8
GOALS = "small, 64 clients: >= 1.5x serial; small, 1 client: >= 1.0x serial; wide, 64 clients: >= 0.8x direct"


def side_by_side(args, levels: list[int]) -> dict:
    """gpu_worker, serial, LitServe and the direct forward, per model and client count, in one run."""
    server_cpus = {args.server_cpu} if args.pin else None
    if args.pin:
        os.sched_setaffinity(0, {args.load_cpu})
    try:
        import litserve  # noqa: F401

        litserve_timeouts = [0.0, 0.002]
    except ImportError:
        print("litserve is not installed (pip install litserve): its columns are left out")
        litserve_timeouts = []
    out: dict = {}
    for name in args.models.split(","):
        width, depth = MODELS[name]
        model = ModelConfig(name="compute", target="gpu_worker.models.compute_mlp:ComputeMLP",
                            options={"width": width, "depth": depth})
        rows: dict = {str(c): {} for c in levels}
        direct_rows_per_s = direct_forward(model, levels, args, server_cpus)
        for c in levels:
            rows[str(c)]["direct_batched_rps"] = direct_rows_per_s[c]
        env = {"OMP_NUM_THREADS": "1"} if args.pin else None
        server = start_server_process(ServerConfig(port=0, device=args.device, models=(model,),
                                                   log_level="WARNING"), env=env)
        if server_cpus:
            os.sched_setaffinity(server.process.pid, server_cpus)
        try:
            for c in levels:
                rows[str(c)]["gpu_worker"] = measured(server.process.pid,
                                                      lambda: load(server.url, compute_obs(), c, args.duration))
        finally:
            server.stop()
        for column, echo in (("serial", False), ("websockets_floor", True)):
            serial, url = start_serial(f"compute={model.target}", args.device, model.options, env=env, echo=echo)
            if server_cpus:
                os.sched_setaffinity(serial.pid, server_cpus)
            try:
                for c in levels:
                    rows[str(c)][column] = measured(serial.pid, lambda: load(url, compute_obs(), c, args.duration))
            finally:
                serial.terminate()
                serial.wait(10)
        for c in levels:
            # The most any websockets server could serve on this core: the forward at batch N plus the floor.
            floor_us = rows[str(c)]["websockets_floor"]["server_cpu_us_per_request"]
            rows[str(c)]["ceiling_rps"] = 1e6 / (1e6 / rows[str(c)]["direct_batched_rps"] + floor_us)
        for timeout in litserve_timeouts:
            proc, url = start_litserve(model.target, model.options, args.device, timeout, server_cpus)
            try:
                for c in levels:
                    figures = measured(proc.pid, lambda: http_load(url, compute_obs(), c, args.duration))
                    figures["batch_timeout_s"] = timeout
                    best = rows[str(c)].get("litserve")
                    if best is None or figures["requests_per_s"] > best["requests_per_s"]:
                        rows[str(c)]["litserve"] = figures
            finally:
                stop_tree(proc)
        out[name] = {"width": width, "depth": depth, "throughput": rows}
    if args.pin:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return out


def direct_forward(model: ModelConfig, levels: list[int], args, cpus: set[int] | None) -> dict[int, float]:
    """Rows per second of the bare batched forward at each batch size, on the servers' CPU and threads."""
    import torch

    previous = (os.sched_getaffinity(0), torch.get_num_threads())
    if cpus:
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(1)
    try:
        policy = load_model(model.target, None, device=args.device, options=model.options)
        return {c: direct_batched(policy, compute_obs(), c, args.duration, args.device) for c in levels}
    finally:
        os.sched_setaffinity(0, previous[0])
        torch.set_num_threads(previous[1])


def print_side_by_side(r: dict) -> None:
    print(f"\nSide by side on {r['device_name']} (torch {r['torch']}); servers pinned: {r['pinned']}; "
          f"requests/s (p50 ms) [server CPU us per request]")
    for name, entry in r["side_by_side"].items():
        print(f"\n  {name} MLP 64-{entry['width']}" + f"-{entry['width']}" * (entry["depth"] - 1) + "-8")
        print("  clients | gpu_worker              | serial openpi-style     | LitServe (best timeout)  "
              "| websockets floor        | direct at batch N | gw/serial | gw/direct | ceiling | gw/ceiling")
        for c, row in entry["throughput"].items():
            def cell(key: str) -> str:
                f = row.get(key)
                if f is None:
                    return f"{'-':>23}"
                return (f"{f['requests_per_s']:7.0f} ({f['p50_ms']:5.2f}) "
                        f"[{f['server_cpu_us_per_request']:4.0f}]")
            g, s = row["gpu_worker"], row["serial"]
            ceiling = row.get("ceiling_rps")
            print(f"  {c:>7} | {cell('gpu_worker')} | {cell('serial')} | {cell('litserve')}  "
                  f"| {cell('websockets_floor')} "
                  f"| {row['direct_batched_rps']:17.0f} | {g['requests_per_s'] / s['requests_per_s']:8.2f}x "
                  f"| {g['requests_per_s'] / row['direct_batched_rps']:8.2f}x "
                  + (f"| {ceiling:7.0f} | {g['requests_per_s'] / ceiling:9.2f}x" if ceiling else "|       - |         -"))
    print(f"\n  goals: {GOALS}")
    print("  websockets floor: a server that answers each request with one fixed frame, without decoding it or "
          "running the model;\n  ceiling: 1 / (1 / direct + the floor's CPU per request), the most a websockets "
          "server on this core could serve")


def write_json(results: dict, out: str | None, kind: str, device: str) -> int:
    """Write ``results`` to ``out`` (default bench/results/gpu_worker_<kind>_<device>.json)."""
    path = pathlib.Path(out or ROOT / "bench" / "results" / f"gpu_worker_{kind}_{device.split(':')[0]}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    return f"CPU: {model} ({os.cpu_count()} cores)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per throughput point")
    parser.add_argument("--latency-n", type=int, default=300)
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--max-wait-ms", type=float, default=None, help="gpu_worker's batching wait (default: its own)")
    parser.add_argument("--compute-width", type=int, default=1024)
    parser.add_argument("--compute-depth", type=int, default=4)
    parser.add_argument("--pin", action="store_true",
                        help="throughput: each server on --server-cpu, this load generator on --load-cpu "
                             "(Linux, 2+ CPUs)")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--side-by-side", action="store_true",
                        help="only the gpu_worker / serial / LitServe / direct table (see the module docstring)")
    parser.add_argument("--models", default="small,wide", help="--side-by-side: small, wide or both")
    parser.add_argument("--batch-wait", default=None, metavar="MS:MS,...",
                        help="instead: compare batching settings, max_wait_ms:batch_gap_ms each (e.g. 0:0,5:0.3,5:0), "
                             "on lock-step and random-arrival clients, pinned like --pin")
    parser.add_argument("--rounds", type=int, default=2, help="--batch-wait: alternating rounds")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        parser.error("--pin needs 2 CPUs: the server on one, the load generator on another")
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"--models: unknown {sorted(unknown)}; known: {sorted(MODELS)}")
    import torch

    results: dict = {
        "device": args.device, "device_name": device_name(args.device), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
    }
    if args.batch_wait:
        if len(os.sched_getaffinity(0)) < 2:
            parser.error("--batch-wait needs 2 CPUs: the server on one, the load generator on another")
        try:
            settings = [(float(wait), float(gap)) for wait, gap in (item.split(":") for item in args.batch_wait.split(","))]
        except ValueError:
            parser.error(f"--batch-wait: expected MS:MS pairs separated by commas, got {args.batch_wait!r}")
        results["batch_wait"] = batch_wait(args, levels, settings)
        results["duration_s"], results["rounds"] = args.duration, args.rounds
        return write_json(results, args.out, "batch_wait", args.device)
    if args.side_by_side:
        results["pinned"] = args.pin
        results["duration_s"] = args.duration
        results["side_by_side"] = side_by_side(args, levels)
        print_side_by_side(results)
        return write_json(results, args.out, "side_by_side", args.device)
    wait_opts = {} if args.max_wait_ms is None else {"max_wait_ms": args.max_wait_ms}

    # 1. Latency.
    server = start_server_process(ServerConfig(port=0, device=args.device, models=(
        ModelConfig.parse(CARTPOLE), ModelConfig.parse(LIBERO)), **wait_opts))
    try:
        rows = {}
        for label, obs, model in (("state-only", state_obs(), None), ("libero-sized", libero_obs(), "libero_tiny")):
            target = CARTPOLE if model is None else LIBERO
            spec = ModelConfig.parse(target)
            policy = load_model(spec.target, spec.checkpoint, device=args.device)
            d = direct_latency(policy, obs, args.latency_n)
            s = server_latency(server.url, obs, args.latency_n, model)
            rows[label] = {"direct_p50_ms": pct(d, 50), "direct_p99_ms": pct(d, 99),
                           "server_p50_ms": pct(s, 50), "server_p99_ms": pct(s, 99)}
        results["latency"] = rows
    finally:
        server.stop()

    # 2. Throughput, compute-bound model.
    compute = ModelConfig(name="compute", target="gpu_worker.models.compute_mlp:ComputeMLP",
                          options={"width": args.compute_width, "depth": args.compute_depth})
    policy = load_model(compute.target, None, device=args.device, options=compute.options)
    results["compute_model"] = {"width": args.compute_width, "depth": args.compute_depth, "pinned": args.pin}

    def pin(pid: int) -> None:
        if args.pin:
            os.sched_setaffinity(pid, {args.server_cpu})
            os.sched_setaffinity(0, {args.load_cpu})

    throughput = {str(c): {} for c in levels}
    for c in levels:
        throughput[str(c)]["direct_batched_rps"] = direct_batched(policy, compute_obs(), c, args.duration, args.device)
    del policy
    server = start_server_process(ServerConfig(port=0, device=args.device, models=(compute,), **wait_opts),
                                  env={"OMP_NUM_THREADS": "1"} if args.pin else None)
    pin(server.process.pid)
    try:
        for c in levels:
            throughput[str(c)]["gpu_worker"] = load(server.url, compute_obs(), c, args.duration)
    finally:
        server.stop()
    serial, serial_url = start_serial(f"compute={compute.target}", options=compute.options,
                                      env={"OMP_NUM_THREADS": "1"} if args.pin else None)
    pin(serial.pid)
    try:
        for c in levels:
            throughput[str(c)]["serial"] = load(serial_url, compute_obs(), c, args.duration)
    finally:
        serial.terminate()
        serial.wait(10)
    results["throughput"] = throughput
    if args.pin:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))

    # 3. Head-of-line blocking by big frames.
    hol = {}
    for label, offload in (("offloaded (default)", 64 * 1024), ("on the event loop", 2**62)):
        server = start_server_process(ServerConfig(port=0, device=args.device, codec_offload_bytes=offload,
                                                   models=(ModelConfig.parse(CARTPOLE), ModelConfig.parse(LIBERO))))
        try:
            hol[label] = stall(server.url, max(100, args.latency_n // 2), senders=2, frame_rows=16)
        finally:
            server.stop()
    results["head_of_line"] = hol

    print_table(results)
    out = pathlib.Path(args.out or ROOT / "bench" / "results" / f"gpu_worker_{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")
    from bench.plots import plot_results

    plot_results(out)
    return 0


def print_table(r: dict) -> None:
    print(f"\ngpu_worker benchmark on {r['device_name']} (torch {r['torch']}, {r['torch_threads']} threads)\n")
    print("Round-trip latency (ms)          direct p50   p99   | server p50   p99")
    for label, row in r["latency"].items():
        print(f"  {label:<30} {row['direct_p50_ms']:9.3f} {row['direct_p99_ms']:7.3f} | "
              f"{row['server_p50_ms']:9.3f} {row['server_p99_ms']:7.3f}")
    print(f"\nThroughput, ComputeMLP width {r['compute_model']['width']} (requests/s)")
    print("  clients | direct batched | gpu_worker (mean batch, p50/p99 ms) | serial openpi-style (p50/p99 ms) | gpu_worker/serial")
    for c, row in r["throughput"].items():
        g, s = row["gpu_worker"], row["serial"]
        print(f"  {c:>7} | {row['direct_batched_rps']:14.0f} | {g['requests_per_s']:9.0f} ({g['mean_batch']:5.1f}, "
              f"{g['p50_ms']:6.2f}/{g['p99_ms']:6.2f}) | {s['requests_per_s']:9.0f} ({s['p50_ms']:6.2f}/{s['p99_ms']:6.2f}) "
              f"| {g['requests_per_s'] / s['requests_per_s']:5.2f}x")
    print("\nState-only latency while 2 clients stream 16-observation LIBERO batch frames")
    for label, row in r["head_of_line"].items():
        print(f"  {label:<22} p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  "
              f"({row['big_frames']} frames of {row['big_frame_mb']} MB)")


if __name__ == "__main__":
    sys.exit(main())
