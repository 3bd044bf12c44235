"""``python -m gpu_worker`` / ``gpu-worker``: start one model server.

Options come from a config file (``--config``, TOML or JSON) and are
overridden by flags. Everything is validated before a model is loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from gpu_worker import __version__
from gpu_worker.config import DEFAULT_MODELS, LOG_LEVELS, ConfigError, ModelConfig, ServerConfig, load_config_file


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu_worker",
        description="openpi-compatible WebSocket model server with dynamic batching across connections.",
    )
    parser.add_argument("--version", action="version", version=f"gpu_worker {__version__}")
    parser.add_argument("--config", help="TOML or JSON file with any of the options below (flags win)")
    net = parser.add_argument_group("network")
    net.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it)")
    net.add_argument("--port", type=int, help="port (default 8000; 0 picks a free one)")
    net.add_argument("--max-message-bytes", type=int, help="largest frame accepted (default 64 MiB)")
    net.add_argument(
        "--api-key-env", metavar="VAR", default="GPU_WORKER_API_KEY",
        help="environment variable holding an API key clients must send as 'Authorization: Api-Key <key>' "
        "(default GPU_WORKER_API_KEY; unset or empty: no key)",
    )
    net.add_argument("--metrics-public", action="store_true", default=None,
                     help="serve GET /metrics without the API key (default: it needs the key when one is set)")
    net.add_argument("--codec-offload-bytes", type=int, help="frames this large are (de)coded off the event loop (default 64 KiB)")
    models = parser.add_argument_group("models")
    models.add_argument(
        "--model",
        action="append",
        metavar="NAME=module:Class[@CHECKPOINT]",
        help=f"host a model; repeat for several, the first is the default (default: {', '.join(DEFAULT_MODELS)})",
    )
    models.add_argument("--device", help="auto (GPU if visible, else CPU), cpu, cuda or cuda:N (default auto)")
    batching = parser.add_argument_group("batching")
    batching.add_argument("--max-batch-size", type=int, help="most rows in one forward pass (default 64)")
    batching.add_argument("--max-wait-ms", type=float, help="the longest a batch waits for more requests, in ms, and never longer than a forward pass (default 5; 0: run what is queued at once)")
    batching.add_argument("--batch-gap-ms", type=float, help="a waiting batch starts once no request has come for this long, and a model whose forward pass is shorter never waits, in ms (default 0.3; 0: wait out --max-wait-ms)")
    batching.add_argument("--max-queue", type=int, help="most rows queued per model before 'overloaded' (default 1024)")
    life = parser.add_argument_group("lifecycle")
    life.add_argument("--shutdown-grace-s", type=float, help="time given to in-flight requests on SIGTERM (default 30)")
    life.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, help="default INFO")
    return parser


def config_from_args(argv: list[str] | None = None) -> ServerConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        values = load_config_file(args.config) if args.config else {}
        for field in (
            "host", "port", "max_message_bytes", "codec_offload_bytes", "device", "max_batch_size",
            "max_wait_ms", "batch_gap_ms", "max_queue", "shutdown_grace_s", "log_level", "metrics_public",
        ):
            value = getattr(args, field)
            if value is not None:
                values[field] = value
        if args.model:
            values["models"] = tuple(ModelConfig.parse(text) for text in args.model)
        if os.environ.get(args.api_key_env):  # from the environment, so it never shows in `ps`
            values["api_key"] = os.environ[args.api_key_env]
        return ServerConfig(**values)
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(argv)
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )
    from gpu_worker.server import serve_until_signalled

    return asyncio.run(serve_until_signalled(config))


if __name__ == "__main__":
    raise SystemExit(main())
