"""The dashboard in a real headless browser: Debian's chromium driven by Playwright (scripts/install_browser.sh
installs both; the test skips where they are missing). It loads the page with the token, sees each model
server's row, sees the counts move after a /score and the jobs table fill, and sees a server that is
stopped shown down; on a laptop-sized window, without horizontal scrolling."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import urllib.request

import pytest

from gpu_worker.config import ModelConfig

CARTPOLE = ModelConfig.parse("cartpole=gpu_worker.models.cartpole:CartPolePolicy")
TOKEN = "dashboard-token-1234"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed "
                                     "(bash scripts/install_browser.sh)")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium (bash scripts/install_browser.sh)")]


def score(app_url: str, n: int) -> dict:
    body = json.dumps({"responses": [{"task": "cartpole_short", "episodes": 1, "seed": s} for s in range(n)]})
    request = urllib.request.Request(f"{app_url}/score", body.encode(), {
        "Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def test_dashboard_shows_servers_counts_jobs_and_a_server_going_down(start_server, serve_app, tmp_path):
    servers = [start_server(models=(CARTPOLE,), log_level="WARNING") for _ in range(2)]
    app = serve_app(model_servers=tuple(s.url for s in servers), token=TOKEN, health_interval_s=0.2,
                    probe_interval_s=0.2, backoff_initial_s=0.1, backoff_max_s=0.5)
    console_errors: list[str] = []
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            # bypass_csp: Playwright's own wait_for_function evaluates strings, which the page's CSP forbids
            page = browser.new_context(viewport={"width": 1366, "height": 768}, bypass_csp=True).new_page()
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)

            page.goto(f"{app.url}/dashboard?interval=250")  # no token yet: the page asks for one
            page.wait_for_selector("#login", state="visible", timeout=10_000)
            assert "token" in page.text_content("#status")

            page.fill("#token", TOKEN)
            page.click("#login button")
            page.wait_for_function("document.querySelectorAll('#servers tr.server').length === 2", timeout=15_000)
            for server in servers:
                row = page.locator(f'#servers tr[data-url="{server.url}"]')
                assert row.locator(".state").text_content() == "up"
            page.wait_for_function("document.getElementById('servers-up').textContent === '2 / 2'")

            before = int(page.text_content("#tasks-ok"))
            result = score(app.url, 4)
            assert result["failures"] == 0
            page.wait_for_function(f"Number(document.getElementById('tasks-ok').textContent) === {before + 4}",
                                   timeout=15_000)
            page.wait_for_function("[...document.querySelectorAll('#jobs tr.job')].some("
                                   f"r => r.dataset.id === {json.dumps(result['job_id'])})", timeout=15_000)
            job_row = page.locator(f'#jobs tr[data-id="{result["job_id"]}"]')
            assert "done" in job_row.text_content() and "4 / 4" in job_row.text_content()
            page.wait_for_function("Number(document.getElementById('score-requests').textContent) >= 1")
            requests_cell = page.locator(f'#servers tr[data-url="{servers[0].url}"] td').nth(6)
            assert int(requests_cell.text_content()) + int(
                page.locator(f'#servers tr[data-url="{servers[1].url}"] td').nth(6).text_content()) > 0

            servers[1].stop(grace_s=1)
            page.wait_for_function(
                f"document.querySelector('#servers tr[data-url=\"{servers[1].url}\"] .state').textContent === 'down'",
                timeout=15_000)
            assert page.locator(f'#servers tr[data-url="{servers[0].url}"] .state').text_content() == "up"
            assert "not up" in page.text_content("#status")
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # fits the laptop

            shot = pathlib.Path(os.environ.get("PI0_DASHBOARD_SCREENSHOT", tmp_path / "dashboard.png"))
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()
    # The only error the console may show: the 401 of the first poll, before the token was given.
    assert [e for e in console_errors if "status of 401" not in e] == [], console_errors
