"""A serial baseline that serves as openpi's reference policy server does.

openpi's ``WebsocketPolicyServer`` runs ``policy.infer`` directly inside the
async connection handler: inference blocks the event loop, so the server
answers one request at a time, and never batches across connections. This
module reproduces that design (same wire format, same models) so the
benchmark can measure our server against it side by side.

    python bench/serial_server.py --model NAME=module:Class --port 8100 [--echo]

``--echo`` is the floor under any websockets server in Python: each request is
answered with one fixed reply frame (the model's answer to a fixed observation,
computed once at start), without decoding the request or running the model, so
its CPU per request is what the websockets library and asyncio cost alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import signal
import sys

import numpy as np
from websockets.asyncio.server import serve

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from gpu_worker import wire  # noqa: E402
from gpu_worker.config import ModelConfig  # noqa: E402
from gpu_worker.model import load_model  # noqa: E402


async def run(model: ModelConfig, host: str, port: int, device: str, echo: bool = False) -> None:
    policy = load_model(model.target, model.checkpoint, device=device, options=model.options)
    reply = None
    if echo:
        sample = {k: np.zeros((1, *(d or 1 for d in spec.shape)), dtype=spec.dtype) for k, spec in policy.input_spec.items()}
        reply = wire.packb({k: v[0] for k, v in policy.infer_batch(sample).items()})

    async def handler(ws) -> None:
        await ws.send(wire.packb(policy.metadata()))
        if reply is not None:
            async for _ in ws:
                await ws.send(reply)
            return
        async for frame in ws:
            obs = wire.unpackb(frame)
            batch = {k: np.asarray(v)[None] for k, v in obs.items() if k in policy.input_spec}
            out = policy.infer_batch(batch)  # on the event loop, like openpi
            await ws.send(wire.packb({k: v[0] for k, v in out.items()}))

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with serve(handler, host, port, compression=None, max_size=None) as server:
        print(f"listening on ws://{host}:{server.sockets[0].getsockname()[1]}", flush=True)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="NAME=module:Class[@CHECKPOINT]")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--options", default="{}", help="the model class's keyword arguments, as JSON")
    parser.add_argument("--echo", action="store_true", help="answer every request with one fixed reply (the floor)")
    args = parser.parse_args()
    model = ModelConfig.parse(args.model)
    model = ModelConfig(model.name, model.target, model.checkpoint, json.loads(args.options))
    asyncio.run(run(model, args.host, args.port, args.device, args.echo))


if __name__ == "__main__":
    main()
