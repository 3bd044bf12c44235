"""The shell scripts: start, health, idempotence, stop, and nothing of theirs left behind."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import time

import pytest

from conftest import ROOT, http_status


def consecutive_free_ports(n: int) -> int:
    for base in range(21000, 60000, 97):
        ok = True
        for port in range(base, base + n):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range")


def alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.fixture
def script_env(tmp_path):
    base = consecutive_free_ports(2)
    env = {**os.environ, "RUN_DIR": str(tmp_path / "run"), "LOG_DIR": str(tmp_path / "logs"), "BASE_PORT": str(base),
           "NUM_GPUS": "0", "NUM_CPU_SERVERS": "2", "STOP_GRACE_S": "20"}
    yield env, base
    subprocess.run(["bash", str(ROOT / "stop_pi0_models.sh")], env=env, capture_output=True, timeout=60)


def run(script: str, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / script)], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_start_is_idempotent_and_stop_leaves_nothing(script_env, tmp_path):
    env, base = script_env
    first = run("start_pi0_models.sh", env)
    assert first.returncode == 0, first.stderr
    assert f"GPU_PORTS={base},{base + 1}" in first.stdout
    pids = [int((tmp_path / "run" / f"pi0_gpu{i}.pid").read_text()) for i in range(2)]
    assert all(alive(pid) for pid in pids)
    for i in range(2):
        assert http_status(f"http://127.0.0.1:{base + i}/healthz") == 200
        assert "ready: models" in (tmp_path / "logs" / f"pi0_gpu{i}.log").read_text()

    again = run("start_pi0_models.sh", env)
    assert again.returncode == 0 and again.stdout.count("already running") == 2
    assert [int((tmp_path / "run" / f"pi0_gpu{i}.pid").read_text()) for i in range(2)] == pids

    stop = run("stop_pi0_models.sh", env)
    assert stop.returncode == 0, stop.stderr
    assert "stopped 2 model server(s)" in stop.stdout
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids)
    assert not list((tmp_path / "run").glob("pi0_gpu*.pid"))
    assert http_status(f"http://127.0.0.1:{base}/healthz") is None
    # No orphan: no live process anywhere still runs a server on these ports.
    leftovers = []
    for cmdline in pathlib.Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"gpu_worker" in args and str(base).encode() in args and alive(int(cmdline.parent.name)):
            leftovers.append(cmdline.parent.name)
    assert not leftovers


def test_stop_never_kills_a_process_it_did_not_start(script_env, tmp_path):
    env, _ = script_env
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "run").mkdir(parents=True, exist_ok=True)
        (tmp_path / "run" / "pi0_gpu0.pid").write_text(str(stranger.pid))  # a reused PID
        result = run("stop_pi0_models.sh", env)
        assert result.returncode == 0
        assert "removing stale PID file" in result.stdout
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_start_refuses_a_port_in_use(script_env):
    env, base = script_env
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", base))
        sock.listen()
        result = run("start_pi0_models.sh", {**env, "NUM_CPU_SERVERS": "1"})
    assert result.returncode == 1
    assert f"port {base} is in use" in result.stderr


def test_start_server_refuses_without_a_healthy_model_server(tmp_path):
    port = consecutive_free_ports(1)
    env = {**os.environ, "MODEL_SERVERS": f"ws://127.0.0.1:{port}", "RUN_DIR": str(tmp_path)}
    result = run("start_server.sh", env, timeout=60)
    assert result.returncode == 1
    assert "no model server is healthy" in result.stderr
    bad = subprocess.run(["bash", str(ROOT / "start_server.sh"), "--fast"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown option '--fast'" in bad.stderr


@pytest.mark.slow
def test_start_server_dev_mode_serves_health(start_server, tmp_path):
    model = start_server()
    port = consecutive_free_ports(1)
    env = {**os.environ, "MODEL_SERVERS": model.url, "PORT": str(port), "HOST": "127.0.0.1"}
    proc = subprocess.Popen(["bash", str(ROOT / "start_server.sh"), "--dev"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while http_status(f"http://127.0.0.1:{port}/health") != 200:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_check_setup_names_the_unreachable_server(tmp_path):
    port = consecutive_free_ports(1)
    env = {**os.environ, "MODEL_SERVERS": f"ws://127.0.0.1:{port}"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "check_setup.sh")], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    assert f"ws://127.0.0.1:{port} unreachable" in result.stdout and "fix: bash start_pi0_models.sh" in result.stdout
    assert "ok    torch" in result.stdout


@pytest.mark.slow
def test_start_runs_any_openpi_compatible_server_from_a_command_template(script_env, tmp_path):
    """MODEL_SERVER_CMD: an openpi-style server per slot, behind a wrapper shell (as `uv run` would be):
    same PID files, logs, health wait, idempotence, and a stop that leaves no child behind."""
    import sys

    import numpy as np

    from pi0_reward_server.client_pool import ClientPool

    env, base = script_env
    server = ROOT / "tests" / "openpi_style_server.py"
    env = {**env, "MODEL_SERVER_CMD": f"echo gpu={{gpu}}; {sys.executable} {server} --host {{host}} --port {{port}} "
                                      "--model gpu_worker.models.cartpole:CartPolePolicy; true"}
    first = run("start_pi0_models.sh", env)
    assert first.returncode == 0, first.stderr
    assert f"GPU_PORTS={base},{base + 1}" in first.stdout
    leaders = [int((tmp_path / "run" / f"pi0_gpu{i}.pid").read_text()) for i in range(2)]
    for i in range(2):
        log = (tmp_path / "logs" / f"pi0_gpu{i}.log").read_text()
        assert "gpu=\n" in log and f"openpi-style server listening on ws://127.0.0.1:{base + i}" in log
    again = run("start_pi0_models.sh", env)
    assert again.returncode == 0 and again.stdout.count("already running") == 2

    with ClientPool([f"ws://127.0.0.1:{base}", f"ws://127.0.0.1:{base + 1}"]).start(wait_s=10) as pool:
        replies, _ = pool.infer_batch([{"observation/state": np.zeros(4, np.float32)}] * 4)
        assert [int(r["actions"]) for r in replies] == [int(replies[0]["actions"])] * 4
        assert {s["server"] for s in pool.status()["servers"]} == {"openpi-compatible"}

    def tagged(tag: str) -> list[int]:
        found = []
        for environ in pathlib.Path("/proc").glob("[0-9]*/environ"):
            try:
                if f"PI0_MODEL_SERVER_TAG={tag}".encode() in environ.read_bytes().split(b"\0"):
                    found.append(int(environ.parent.name))
            except OSError:
                continue
        return found

    run_dir = (tmp_path / "run").resolve()
    processes = [pid for i in range(2) for pid in tagged(f"{run_dir}:{i}") if alive(pid)]
    servers = [pid for pid in processes if pid not in leaders]
    assert len(servers) == 2  # each wrapper shell (the leader) has the server as its child
    os.kill(leaders[0], signal.SIGKILL)  # a wrapper that died: its server, still running, must be stopped too
    deadline = time.monotonic() + 10
    while alive(leaders[0]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stop = run("stop_pi0_models.sh", env)
    assert stop.returncode == 0 and "stopped 2 model server(s)" in stop.stdout, stop.stdout + stop.stderr
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in servers + leaders) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in servers + leaders)
    assert http_status(f"http://127.0.0.1:{base}/healthz") is None


def test_start_refuses_a_command_template_without_a_port(script_env):
    env, _ = script_env
    result = run("start_pi0_models.sh", {**env, "MODEL_SERVER_CMD": "python serve.py --port 8000"})
    assert result.returncode == 2 and "MODEL_SERVER_CMD must contain {port}" in result.stderr
