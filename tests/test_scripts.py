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


def run(script: str, env: dict, timeout: float = 180, args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def tagged(tag: str) -> list[int]:
    """Live processes whose environment carries PI0_MODEL_SERVER_TAG=tag."""
    found = []
    for environ in pathlib.Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"PI0_MODEL_SERVER_TAG={tag}".encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return [pid for pid in found if alive(pid)]


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


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


@pytest.mark.slow
def test_supervised_server_killed_during_score_comes_back_and_stop_ends_it_all(script_env, tmp_path, make_app):
    import threading

    env, base = script_env
    env = {**env, "SUPERVISE_BACKOFF_INITIAL_S": "0.5", "SUPERVISE_BACKOFF_MAX_S": "2"}
    started = run("start_pi0_models.sh", env, args=("--supervise",))
    assert started.returncode == 0, started.stderr
    supervisors = [int((tmp_path / "run" / f"pi0_gpu{i}.pid").read_text()) for i in range(2)]
    servers = [children(pid) for pid in supervisors]
    assert all(len(c) == 1 for c in servers), servers  # each supervisor runs one server
    app = make_app(model_servers=(f"ws://127.0.0.1:{base}", f"ws://127.0.0.1:{base + 1}"),
                   health_interval_s=0.2, probe_interval_s=0.2, backoff_initial_s=0.1, backoff_max_s=0.5)
    client = app.test_client()
    answer: dict = {}
    work = {"responses": [{"task": "cartpole", "episodes": 4, "seed": s} for s in range(16)],
            "reward_function_kwargs": {"max_workers": 4}}
    thread = threading.Thread(target=lambda: answer.update(response=client.post("/score", json=work)))
    thread.start()
    time.sleep(0.5)
    killed_at = time.monotonic()
    assert thread.is_alive()  # the /score is in flight when its server dies
    os.kill(servers[0][0], signal.SIGKILL)
    thread.join(120)
    response = answer["response"]
    assert response.status_code == 200 and not [d for d in response.get_json()["details"] if d.get("error")], \
        response.get_json()
    while http_status(f"http://127.0.0.1:{base}/healthz") != 200:  # back, after a 0.5 s backoff and a load
        assert time.monotonic() - killed_at < 60, (tmp_path / "logs" / "pi0_gpu0.log").read_text()
        time.sleep(0.1)
    log = (tmp_path / "logs" / "pi0_gpu0.log").read_text()
    assert "server exited (signal SIGKILL)" in log and "restarting in 0.5s" in log
    assert alive(supervisors[0]) and children(supervisors[0]) != servers[0]
    deadline = time.monotonic() + 30  # the pool notices through its health checks
    while client.get("/pool_status").get_json()["totals"]["up"] != 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    stop = run("stop_pi0_models.sh", env)
    assert stop.returncode == 0 and "stopped 2 model server(s)" in stop.stdout, stop.stdout + stop.stderr
    run_dir = (tmp_path / "run").resolve()
    deadline = time.monotonic() + 15
    while any(tagged(f"{run_dir}:{i}") for i in range(2)):
        assert time.monotonic() < deadline, "a supervisor or a server outlived the stop"
        time.sleep(0.1)
    assert "server stopped" in (tmp_path / "logs" / "pi0_gpu1.log").read_text()


@pytest.mark.slow
def test_a_crash_looping_supervised_server_is_given_up_on(script_env, tmp_path):
    env, _ = script_env
    # A wrapper that dies leaving a child behind (as `uv run` or `bash -c` can): the child must not survive it.
    env = {**env, "NUM_CPU_SERVERS": "1", "MODEL_SERVER_CMD": "sleep 300 & echo crashing on {port}; exit 3",
           "SUPERVISE_BACKOFF_INITIAL_S": "0.05", "SUPERVISE_MAX_RESTARTS": "2", "SUPERVISE_STABLE_S": "60"}
    result = run("start_pi0_models.sh", env, args=("--supervise",), timeout=60)
    assert result.returncode == 1 and "server 0" in result.stderr and "exited" in result.stderr
    log = (tmp_path / "logs" / "pi0_gpu0.log").read_text()
    assert log.count("\ncrashing on") == 3  # the first run and two restarts (each line starts with it)
    assert "giving up: the server exited 3 times in a row, each within 60s of its start (crash loop; last: " \
           "exit code 3" in log
    assert "giving up" in result.stderr  # the start script shows the log's last lines
    assert log.count("left behind") == 3
    run_dir = (tmp_path / "run").resolve()
    assert tagged(f"{run_dir}:0") == []  # no supervisor, no wrapper, no leftover sleep


def test_start_refuses_an_unknown_argument(script_env):
    env, _ = script_env
    result = run("start_pi0_models.sh", env, args=("--superivse",))
    assert result.returncode == 2 and "unknown argument '--superivse'" in result.stderr


def test_supervisor_alone_signalled_stops_its_server_and_a_signal_ends_a_backoff(tmp_path):
    import sys

    def supervise(*command: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "gpu_worker.supervise", "--backoff-initial-s", "30", "--",
                                 *command], cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True)

    running = supervise("sleep", "300")
    deadline = time.monotonic() + 10
    while not children(running.pid):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = children(running.pid)[0]
    running.send_signal(signal.SIGTERM)  # the supervisor's PID only, not its group
    assert running.wait(10) == 0 and not alive(child)
    assert "SIGTERM received: stopping the server" in running.stderr.read()

    crashing = supervise("false")  # exits at once; the supervisor then waits 30 s before a restart
    deadline = time.monotonic() + 10
    log = ""
    while "restarting in 30s" not in log:
        assert time.monotonic() < deadline
        time.sleep(0.05)
        log = crashing.stderr.readline() if crashing.poll() is None else log
    started = time.monotonic()
    crashing.send_signal(signal.SIGTERM)
    assert crashing.wait(10) == 0 and time.monotonic() - started < 5  # not after the 30 s backoff
