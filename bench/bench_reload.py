"""Hot reload under load: how long a reload takes (load + warm-up + swap) and what the requests across it see.

One gpu_worker process hosts each model from a checkpoint written here (v1); ``--clients`` threads send it
requests without pause while the benchmark reloads v2 through the admin path. Latency percentiles are
reported for the requests that ended before the reload started, those that overlapped it, and those sent
after it answered; failed requests are counted (the goal: none). Models: the shipped CartPole MLP and
Connect Four network, and a larger ComputeMLP (``--large-width`` x ``--large-depth``).

    python bench/bench_reload.py                 # prints a table, writes bench/results/reload_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.benchlib import write_results  # noqa: E402
from gpu_worker.client import ModelClient, admin_call  # noqa: E402
from gpu_worker.model import load_model  # noqa: E402

MODELS = {
    "cartpole": ("gpu_worker.models.cartpole:CartPolePolicy", {}),
    "connect4": ("gpu_worker.models.selfplay_net:Connect4Net", {}),
    "large_mlp": ("gpu_worker.models.compute_mlp:ComputeMLP", None),  # options from the flags
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_checkpoints(folder: pathlib.Path, name: str, target: str, options: dict) -> tuple[str, str, float]:
    """v1 and v2 of a model: its initial weights and the same weights perturbed; and its size in MB."""
    model = load_model(target, None, device="cpu", options=options)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    paths = []
    for version in (1, 2):
        if version == 2:
            generator = torch.Generator().manual_seed(2)
            state = {k: v + 0.01 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                     for k, v in state.items()}
        path = folder / f"{name}_v{version}.pt"
        torch.save(state, path)
        paths.append(str(path))
    megabytes = sum(v.numel() * v.element_size() for v in state.values()) / 1e6
    return paths[0], paths[1], megabytes


def zeros_for(client: ModelClient, model: str) -> dict:
    spec = client.metadata["models"][model]["inputs"]
    return {key: np.zeros([1 if d == -1 else d for d in entry["shape"]], dtype=np.dtype(entry["dtype"]))
            for key, entry in spec.items()}


def measure(url: str, model: str, checkpoint: str, clients: int, before_s: float, after_s: float) -> dict:
    records: list[tuple[float, float, str | None]] = []  # (start, end, version or None on failure)
    lock, stop = threading.Lock(), threading.Event()

    def load() -> None:
        with ModelClient(f"{url}/models/{model}") as client:
            obs = zeros_for(client, model)
            while not stop.is_set():
                started = time.monotonic()
                try:
                    version = client.infer(obs)["model"]["version"]
                except Exception:  # noqa: BLE001 - counted as a failure
                    version = None
                with lock:
                    records.append((started, time.monotonic(), version))

    threads = [threading.Thread(target=load, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(before_s)
    reload_start = time.monotonic()
    answer = admin_call(url, {"command": "reload", "model": model, "checkpoint": checkpoint})
    reload_end = time.monotonic()
    time.sleep(after_s)
    stop.set()
    for t in threads:
        t.join(30)
    if not answer.get("ok"):
        raise RuntimeError(f"reload of {model} refused: {answer.get('error')}")

    def percentiles(rows: list) -> dict:
        latencies = [(end - start) * 1000 for start, end, _ in rows]
        if not latencies:
            return {"requests": 0, "p50_ms": None, "p99_ms": None}
        return {"requests": len(latencies), "p50_ms": round(float(np.percentile(latencies, 50)), 3),
                "p99_ms": round(float(np.percentile(latencies, 99)), 3)}

    ok = [r for r in records if r[2] is not None]
    phases = {
        "before": percentiles([r for r in ok if r[1] < reload_start]),
        "during": percentiles([r for r in ok if r[1] >= reload_start and r[0] <= reload_end]),
        "after": percentiles([r for r in ok if r[0] > reload_end]),
    }
    versions = [r[2] for r in sorted(ok)]
    return {
        "load_s": answer["load_s"], "warmup_s": answer["warmup_s"], "swap_ms": round(answer["swap_s"] * 1000, 3),
        "reload_wall_s": round(reload_end - reload_start, 3), "failed_requests": len(records) - len(ok),
        "old_version": answer["previous_version"], "new_version": answer["version"],
        "served_new_after": all(r[2] == answer["version"] for r in ok if r[0] > reload_end),
        "versions_seen": sorted(set(versions)), "phases": phases,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--before-s", type=float, default=2.0)
    parser.add_argument("--after-s", type=float, default=2.0)
    parser.add_argument("--large-width", type=int, default=2048)
    parser.add_argument("--large-depth", type=int, default=6)
    parser.add_argument("--models", default="cartpole,connect4,large_mlp")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    names = [n for n in args.models.split(",") if n]
    folder = pathlib.Path(tempfile.mkdtemp(prefix="bench-reload-"))
    models, checkpoints, sizes = [], {}, {}
    for name in names:
        target, options = MODELS[name]
        options = {"width": args.large_width, "depth": args.large_depth} if options is None else options
        v1, v2, megabytes = write_checkpoints(folder, name, target, options)
        checkpoints[name], sizes[name] = v2, megabytes
        models.append({"name": name, "target": target, "checkpoint": v1, "options": options})
    config = folder / "server.json"
    port = free_port()
    config.write_text(json.dumps({"host": "127.0.0.1", "port": port, "device": args.device, "models": models,
                                  "log_level": "WARNING"}))
    server = subprocess.Popen([sys.executable, "-m", "gpu_worker", "--config", str(config)], cwd=ROOT)
    url = f"ws://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                    break  # 200: loaded (503 while loading raises)
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the model server did not start")
                time.sleep(0.2)
        results = {}
        for name in names:
            results[name] = {"weights_mb": round(sizes[name], 3),
                             **measure(url, name, checkpoints[name], args.clients, args.before_s, args.after_s)}
    finally:
        server.terminate()
        server.wait(30)
    cores = len(os.sched_getaffinity(0))
    device = args.device if args.device != "cpu" else f"cpu ({platform.machine()}, {cores} cores)"
    print(f"\nHot reload under {args.clients} clients sending without pause, on {device}")
    print(f"{'model':<10} {'MB':>7} {'load s':>7} {'warm s':>7} {'swap ms':>8} {'failed':>6} "
          f"{'p50/p99 ms before':>18} {'during':>14} {'after':>14}")
    for name, r in results.items():
        cells = [f"{r['phases'][p]['p50_ms']}/{r['phases'][p]['p99_ms']}" for p in ("before", "during", "after")]
        print(f"{name:<10} {r['weights_mb']:>7} {r['load_s']:>7.3f} {r['warmup_s']:>7.3f} {r['swap_ms']:>8.3f} "
              f"{r['failed_requests']:>6} {cells[0]:>18} {cells[1]:>14} {cells[2]:>14}")
    out = args.out or str(ROOT / "bench" / "results" / f"reload_{args.device.split(':')[0]}.json")
    write_results(out, {"device": device, "clients": args.clients, "models": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
