"""The same models served by LitServe, the batching server users would otherwise pick, for the benchmark.

LitServe (Lightning AI) puts a FastAPI/uvicorn HTTP front end before inference worker processes and batches
requests across callers (``max_batch_size``, ``batch_timeout``). JSON in, JSON out, as its users send:

    POST /predict {"observation/state": [64 floats]}  ->  {"actions": [8 floats]}

    python bench/litserve_server.py --model NAME=module:Class --options '{"width": 256}' --port 8200 \
        --max-batch-size 64 --batch-timeout 0.002

Prints ``listening on http://HOST:PORT`` once it answers its health check. Every process it starts
inherits this one's CPU affinity, so pinning this process pins the whole server.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import socket
import sys
import threading
import time
import urllib.request

import litserve as ls
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ModelAPI(ls.LitAPI):
    """A gpu_worker policy behind LitServe's request cycle (module level: LitServe pickles it to its workers)."""

    def __init__(self, target: str, options: dict, device: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.target, self.options, self.model_device = target, options, device

    def setup(self, _device) -> None:
        from gpu_worker.model import load_model

        self.policy = load_model(self.target, None, device=self.model_device, options=self.options)
        self.keys = list(self.policy.input_spec)

    def decode_request(self, request):
        return {key: np.asarray(request[key], dtype=np.float32) for key in self.keys}

    def batch(self, inputs):
        return {key: np.stack([item[key] for item in inputs]) for key in self.keys}

    def predict(self, x):
        if all(np.ndim(v) == 1 for v in x.values()):  # unbatched: one request
            return {k: v[0] for k, v in self.policy.infer_batch({k: v[None] for k, v in x.items()}).items()}
        return self.policy.infer_batch(x)

    def unbatch(self, output):
        rows = len(next(iter(output.values())))
        return [{k: v[i] for k, v in output.items()} for i in range(rows)]

    def encode_response(self, output):
        return {k: np.asarray(v).tolist() for k, v in output.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="NAME=module:Class")
    parser.add_argument("--options", default="{}", help="the model class's keyword arguments, as JSON")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-timeout", type=float, default=0.0, help="seconds LitServe waits to fill a batch")
    args = parser.parse_args()
    _, target = args.model.split("=", 1)
    port = args.port or free_port()
    api = ModelAPI(target, json.loads(args.options), args.device, max_batch_size=args.max_batch_size,
                   batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="cuda" if args.device.startswith("cuda") else "cpu", devices=1,
                          workers_per_device=1)

    def announce() -> None:
        url = f"http://{args.host}:{port}"
        for _ in range(600):
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as response:
                    if response.status == 200:
                        print(f"listening on {url}", flush=True)
                        return
            except OSError:
                time.sleep(0.1)

    threading.Thread(target=announce, daemon=True).start()
    server.run(host=args.host, port=port, num_api_servers=1, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
