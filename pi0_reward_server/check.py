"""Setup check: what is missing or wrong, and how to fix it.

    python -m pi0_reward_server.check [--servers-only]

Checks Python packages, GPUs (nvidia-smi against torch's view), the reward
port, and every configured model server's ``/healthz`` (``MODEL_SERVERS`` /
``GPU_PORTS``, as the app reads them). Exit code 0 when all is well (with
``--servers-only``: when at least one model server is healthy), else 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request

from pi0_reward_server.client_pool import health_url
from pi0_reward_server.config import ConfigError, load_config

PACKAGES = {
    "numpy": "numpy", "msgpack": "msgpack", "websockets": "websockets", "torch": "torch==2.13.0 (CPU) or a CUDA build",
    "flask": "flask", "gunicorn": "gunicorn", "gymnasium": "gymnasium", "tqdm": "tqdm",
}


def _ok(message: str) -> None:
    print(f"  ok    {message}")


def _bad(problems: list[str], message: str, fix: str) -> None:
    print(f"  FAIL  {message}\n        fix: {fix}")
    problems.append(message)


def check_packages(problems: list[str]) -> None:
    print("Python packages")
    for module, spec in PACKAGES.items():
        try:
            importlib.import_module(module)
            _ok(module)
        except ImportError as exc:
            _bad(problems, f"{module} cannot be imported ({exc})", f"bash scripts/install.sh  (or pip install {spec})")


def check_gpus(problems: list[str]) -> None:
    print("GPUs")
    smi = shutil.which("nvidia-smi")
    gpus = 0
    if smi:
        result = subprocess.run([smi, "-L"], capture_output=True, text=True)
        gpus = sum(line.startswith("GPU ") for line in result.stdout.splitlines())
    try:
        import torch

        cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        cuda = 0
    if gpus == 0:
        _ok("no GPU found: model servers will run on the CPU (start_pi0_models.sh starts NUM_CPU_SERVERS of them)")
    elif cuda == 0:
        _bad(problems, f"nvidia-smi lists {gpus} GPU(s) but torch sees none",
             "install a CUDA build of torch: TORCH_SPEC=torch bash scripts/install.sh")
    else:
        _ok(f"{gpus} GPU(s); torch sees {cuda} (one model server per GPU)")


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def check_reward_port(problems: list[str], port: int) -> None:
    print("Reward app port")
    if _port_in_use(port):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                _ok(f"port {port} already serves a reward app")
                return
        except (urllib.error.URLError, OSError):
            pass
        _bad(problems, f"port {port} is in use by another process", f"stop it (ss -ltnp 'sport = :{port}') or set PORT")
    else:
        _ok(f"port {port} is free")


def check_model_servers(problems: list[str]) -> int:
    print("Model servers")
    try:
        config = load_config()
    except ConfigError as exc:
        _bad(problems, f"configuration: {exc}", "fix MODEL_SERVERS / GPU_PORTS / REWARD_* variables")
        return 0
    healthy = 0
    for url in config.model_servers:
        try:
            with urllib.request.urlopen(health_url(url), timeout=3) as response:
                if response.status == 200:
                    healthy += 1
                    _ok(f"{url} healthy")
                    continue
        except urllib.error.HTTPError as exc:
            _bad(problems, f"{url} answers /healthz with {exc.code}", "wait for its models to load; see logs/pi0_gpu*.log")
            continue
        except (urllib.error.URLError, OSError) as exc:
            _bad(problems, f"{url} unreachable ({getattr(exc, 'reason', exc)})",
                 "bash start_pi0_models.sh, or set MODEL_SERVERS / GPU_PORTS to where they run")
    return healthy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers-only", action="store_true", help="only check that a model server is healthy")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "6006")), help="reward app port")
    args = parser.parse_args(argv)
    problems: list[str] = []
    if args.servers_only:
        return 0 if check_model_servers(problems) > 0 else 1
    check_packages(problems)
    check_gpus(problems)
    check_reward_port(problems, args.port)
    check_model_servers(problems)
    print(f"\n{len(problems)} problem(s)" if problems else "\nall checks passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
