"""The dashboard under a minute of real load, photographed: two CPU model servers, the reward app under
gunicorn with two workers and a token, /score requests and a job running, one model server stopped near the
end. Saves bench/results/dashboard.png (a laptop-sized window) and prints what the page showed.

    python bench/bench_dashboard.py [--seconds 60]

Needs Playwright and Debian's chromium (bash scripts/install_browser.sh).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.benchlib import start_reward_app  # noqa: E402
from gpu_worker.config import ModelConfig, ServerConfig  # noqa: E402
from gpu_worker.launch import start_server_process  # noqa: E402

CARTPOLE = ModelConfig.parse("cartpole=gpu_worker.models.cartpole:CartPolePolicy")
TOKEN = "bench-dashboard-token"


def post(base: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"{base}{path}", json.dumps(body).encode(), {
        "Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "dashboard.png"))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium: bash scripts/install_browser.sh")
    servers = [start_server_process(ServerConfig(port=0, models=(CARTPOLE,), log_level="WARNING"),
                                    env={"OMP_NUM_THREADS": "1"}) for _ in range(2)]
    app, base = start_reward_app([s.url for s in servers], threads=8,
                                 env={"REWARD_SERVER_TOKEN": TOKEN, "GUNICORN_WORKERS": "2",
                                      "REWARD_HEALTH_INTERVAL_S": "0.5",
                                      "REWARD_DATA_DIR": tempfile.mkdtemp(prefix="bench-dashboard-")})
    stop = threading.Event()

    def load(first_seed: int) -> None:
        seed = first_seed
        while not stop.is_set():
            post(base, "/score", {"responses": [{"task": "cartpole_short", "episodes": 1, "seed": seed + i}
                                                for i in range(8)], "reward_function_kwargs": {"max_workers": 4}})
            seed += 8

    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
            page = browser.new_context(viewport={"width": 1366, "height": 768}).new_page()
            page.goto(f"{base}/dashboard#token={TOKEN}")
            loaders = [threading.Thread(target=load, args=(k * 10**6,), daemon=True) for k in range(2)]
            for t in loaders:
                t.start()
            post(base, "/jobs", {"responses": [{"task": "cartpole", "episodes": 600, "seed": s} for s in range(16)],
                                 "reward_function_kwargs": {"max_workers": 2}})
            time.sleep(args.seconds * 0.75)
            servers[1].stop()
            time.sleep(args.seconds * 0.25)
            stop.set()
            out = pathlib.Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            print(page.text_content("#status"))
            print(page.inner_text("#servers"))
            print(page.text_content("#rates"))
            print(f"wrote {out}")
            browser.close()
    finally:
        stop.set()
        app.terminate()
        app.wait(60)
        for server in servers:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
