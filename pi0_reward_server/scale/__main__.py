"""``python -m pi0_reward_server.scale servers``: model servers as Ray actors, held until SIGINT/SIGTERM.

    python -m pi0_reward_server.scale servers --address auto --app-url http://app:8080 -- --model ...

starts one gpu_worker per GPU in the cluster (``--cpu-servers N`` for CPU ones), registers each with the
app (``POST /admin/pool/servers``, the token from ``$REWARD_SERVER_TOKEN``; with ``--name``, first
deregistering what an earlier, killed launcher of that name left behind), prints one JSON line per
server, deregisters any whose actor dies, and on SIGINT/SIGTERM deregisters them all, lets each drain and
stops it. Arguments after ``--`` go to ``python -m gpu_worker`` as they are.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pi0_reward_server.scale",
                                     description="Scale-out on Ray: model servers as Ray actors.")
    commands = parser.add_subparsers(dest="command", required=True)
    servers = commands.add_parser("servers", help="start model servers as Ray actors and hold them until stopped")
    servers.add_argument("--address", default="auto",
                         help="the Ray cluster (default auto: the one this node joined with 'ray start')")
    servers.add_argument("--gpu-servers", type=int, default=None, metavar="N",
                         help="GPU servers, one GPU each (default: one per GPU in the cluster)")
    servers.add_argument("--cpu-servers", type=int, default=None, metavar="N",
                         help="CPU servers instead (where the cluster has no GPU)")
    servers.add_argument("--cpus-per-server", type=float, default=1.0, help="CPUs each CPU server reserves (default 1)")
    servers.add_argument("--bind-host", default=None,
                         help="address the servers bind (default: each node's own address; 0.0.0.0 for all)")
    servers.add_argument("--app-url", default=None, help="the reward app to register with (http://host:port)")
    servers.add_argument("--name", default=None,
                         help="register the servers under this launcher name, and first deregister any the app still "
                              "holds under it (left by an earlier launcher that was killed); one name per launcher")
    servers.add_argument("--token-env", default="REWARD_SERVER_TOKEN", metavar="VAR",
                         help="environment variable holding the app's token (default REWARD_SERVER_TOKEN)")
    servers.add_argument("--watch-interval-s", type=float, default=2.0,
                         help="how often dead server actors are looked for (default 2)")
    servers.add_argument("--grace-s", type=float, default=30.0, help="drain time at stop (default 30)")
    servers.add_argument("server_args", nargs=argparse.REMAINDER,
                         help="after '--': arguments for python -m gpu_worker (--model ..., --max-batch-size ...)")
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.server_args[:1] == ["--"]:
        args.server_args = args.server_args[1:]
    if args.gpu_servers is not None and args.cpu_servers is not None:
        parser.error("give --gpu-servers or --cpu-servers, not both")
    for name in ("gpu_servers", "cpu_servers"):
        value = getattr(args, name)
        if value is not None and not 1 <= value <= 4096:
            parser.error(f"--{name.replace('_', '-')} must be between 1 and 4096, got {value}")
    if not 0 < args.cpus_per_server <= 1024:
        parser.error(f"--cpus-per-server must be in (0, 1024], got {args.cpus_per_server}")
    if not 0 < args.watch_interval_s <= 3600 or not 0 <= args.grace_s <= 3600:
        parser.error("--watch-interval-s must be in (0, 3600] and --grace-s in [0, 3600]")
    if args.app_url is not None:
        if not args.app_url.startswith(("http://", "https://")):
            parser.error(f"--app-url {args.app_url!r} must start with http:// or https://")
        if not os.environ.get(args.token_env):
            parser.error(f"--app-url needs the app's token in ${args.token_env}")
    elif args.name is not None:
        parser.error("--name registers with an app: give --app-url too")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import ray

    from pi0_reward_server.scale.ray_servers import AppRegistrar, launch_servers

    registrar = AppRegistrar(args.app_url, os.environ[args.token_env], launcher=args.name) if args.app_url else None
    if registrar is not None and args.name:
        try:
            stale = registrar.remove_stale()
        except (RuntimeError, OSError) as exc:
            print(f"error: cannot read the app's pool at {args.app_url}: {exc}", file=sys.stderr)
            return 1
        if stale:
            logging.getLogger(__name__).info("deregistered %d server(s) left by an earlier launcher %r: %s",
                                             len(stale), args.name, ", ".join(stale))
    try:
        ray.init(address=args.address, namespace="pi0_reward_server", log_to_driver=False)
    except ConnectionError as exc:
        print(f"error: no Ray cluster at --address {args.address}: start one with 'ray start --head' ({exc})",
              file=sys.stderr)
        return 2
    cpu = args.cpu_servers is not None
    try:
        group = launch_servers(args.cpu_servers if cpu else args.gpu_servers, server_args=args.server_args,
                               num_gpus=0.0 if cpu else 1.0, num_cpus=args.cpus_per_server if cpu else None,
                               bind_host=args.bind_host, registrar=registrar)
    except (RuntimeError, ValueError, TimeoutError, ray.exceptions.RayError) as exc:  # a server that failed to start
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for server in group.servers:
        print(json.dumps(server), flush=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    group.watch(args.watch_interval_s)
    stop.wait()
    logging.getLogger(__name__).info("stopping %d model server(s)", len(group.urls))
    group.stop(args.grace_s)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
