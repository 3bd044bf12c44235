"""Pieces the benchmark scripts share: starting the reward app, writing results."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]


def start_reward_app(urls: list[str], *, threads: int = 8, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """The reward app under gunicorn on a free loopback port, once every model server is up."""
    env = {**os.environ, "MODEL_SERVERS": ",".join(urls), "GUNICORN_BIND": "127.0.0.1:0", "GUNICORN_WORKERS": "1",
           "GUNICORN_THREADS": str(threads), "REWARD_LOG_LEVEL": "WARNING", **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "pi0_reward_server/gunicorn_config.py",
         "--access-logfile", "/dev/null", "pi0_reward_server.app:create_app()"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    port = None
    for line in proc.stderr:
        match = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", line)
        if match:
            port = int(match.group(1))
            break
    if port is None:
        raise RuntimeError("gunicorn did not start")
    # Keep draining its log so it never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200 and json.loads(response.read())["model_servers_up"] == len(urls):
                    return proc, base
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("reward app never became healthy")


def write_results(path: str | pathlib.Path, results: dict) -> None:
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")
    from bench.plots import plot_results

    plot_results(out)  # a PNG beside it, where the results have a plot and matplotlib is installed
