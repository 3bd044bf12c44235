"""Benchmark a hosted LeRobot SmolVLA: dynamic batching vs one request at a time.

    python bench/bench_lerobot.py [--size tiny|full] [--checkpoint DIR] [--device cpu|cuda]
                                  [--clients 1,8,32] [--duration 5] [--out bench/results/...json]

With no ``--checkpoint``, a SmolVLA with random weights is built offline
(``scripts/make_tiny_smolvla.py``; ``--size full`` has SmolVLA's real shapes,
356 M parameters: for a GPU). At each number of concurrent clients (one
connection each, lock-step, LIBERO-sized observations), in one run so the
ratios are side by side:

* gpu_worker with dynamic batching (the product);
* gpu_worker with ``max_batch_size = 1`` (the same server, one request at a time);
* bench/serial_server.py, which serves as openpi's reference server does
  (inference on the event loop, one request at a time, no batching);
* the direct in-process batched forward at that batch size (the limit).

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_gpu_worker import device_name, direct_batched, libero_obs, load, start_serial  # noqa: E402
from benchlib import write_results  # noqa: E402

from gpu_worker.config import ModelConfig, ServerConfig  # noqa: E402
from gpu_worker.launch import start_server_process  # noqa: E402
from gpu_worker.model import load_model  # noqa: E402

TARGET = "gpu_worker.models.lerobot:LeRobotPolicy"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--checkpoint", default=None, help="a LeRobot checkpoint directory (default: build one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per point")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    scratch = tempfile.TemporaryDirectory()
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = str(pathlib.Path(scratch.name) / f"smolvla_{args.size}")
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_smolvla.py"), checkpoint,
                        "--size", args.size], check=True, cwd=ROOT)
    import torch

    model = ModelConfig(name="smolvla", target=TARGET, checkpoint=checkpoint)
    policy = load_model(TARGET, checkpoint, device=args.device)
    results: dict = {
        "device": args.device, "device_name": device_name(args.device), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
        "model": {"size": args.size if args.checkpoint is None else "given", "type": policy.cfg.type,
                  "parameters": sum(p.numel() for p in policy.policy.parameters()),
                  "chunk": policy.chunk, "num_steps": policy.metadata()["num_steps"]},
        "duration_s": args.duration, "max_batch_size": args.max_batch_size,
    }
    obs = libero_obs()
    points = {str(c): {"direct_batched_rps": direct_batched(policy, obs, c, args.duration, args.device)}
              for c in levels}
    del policy
    for label, batch in (("batched", args.max_batch_size), ("one_at_a_time", 1)):
        server = start_server_process(ServerConfig(port=0, device=args.device, models=(model,), max_batch_size=batch,
                                                   log_level="WARNING"), timeout=600)
        try:
            for c in levels:
                points[str(c)][label] = load(server.url, obs, c, args.duration)
        finally:
            server.stop()
    serial, url = start_serial(f"smolvla={TARGET}@{checkpoint}", device=args.device)
    try:
        for c in levels:
            points[str(c)]["serial_openpi_style"] = load(url, obs, c, args.duration)
    finally:
        serial.terminate()
        serial.wait(30)
    results["throughput"] = points
    print_table(results)
    name = f"lerobot_smolvla_{results['model']['size']}_{args.device.split(':')[0]}.json"
    write_results(args.out or ROOT / "bench" / "results" / name, results)
    scratch.cleanup()
    return 0


def print_table(r: dict) -> None:
    m = r["model"]
    print(f"\nLeRobot {m['type']} ({m['parameters'] / 1e6:.2f} M parameters, chunk {m['chunk']}, "
          f"{m['num_steps']} denoising steps) on {r['device_name']}, torch {r['torch']}\n")
    print("  clients | direct batched | gpu_worker batched (mean batch, p50 ms) | one at a time (p50) "
          "| serial openpi-style (p50) | batched / one at a time | batched / serial")
    for c, row in r["throughput"].items():
        b, one, s = row["batched"], row["one_at_a_time"], row["serial_openpi_style"]
        print(f"  {c:>7} | {row['direct_batched_rps']:10.1f}/s | {b['requests_per_s']:8.1f}/s ({b['mean_batch']:5.1f}, "
              f"{b['p50_ms']:7.1f}) | {one['requests_per_s']:8.1f}/s ({one['p50_ms']:7.1f}) | "
              f"{s['requests_per_s']:8.1f}/s ({s['p50_ms']:7.1f}) | {b['requests_per_s'] / one['requests_per_s']:5.2f}x "
              f"| {b['requests_per_s'] / s['requests_per_s']:5.2f}x")


if __name__ == "__main__":
    sys.exit(main())
