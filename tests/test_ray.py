"""Scale-out on Ray, on a local two-node Ray cluster (``ray.cluster_utils.Cluster``) shared by the module.

Model servers launched as Ray actors join the app's pool and serve ``/score``; a server actor killed
mid-request leaves the pool while its request completes elsewhere; rollouts in ``execution = "ray"``
score as the local thread mode (and, for LIBERO, the process mode) does; a Ray worker killed mid-task
still gives exactly one result; cancelling a job stops its Ray tasks.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import threading
import time

import numpy as np
import pytest

try:
    import ray
except ImportError:
    if os.environ.get("CI"):
        raise RuntimeError("CI must install the ray extra (scripts/install_ray.sh)") from None
    pytest.skip("the ray extra is not installed (scripts/install_ray.sh)", allow_module_level=True)

from gpu_worker.config import ModelConfig  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]
TOKEN = "ray-scaleout-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CARTPOLE = ModelConfig.parse("cartpole=gpu_worker.models.cartpole:CartPolePolicy")
CONNECT4 = ModelConfig.parse("connect4=gpu_worker.models.selfplay_net:Connect4Net")


@pytest.fixture(scope="module")
def cluster():
    """Two simulated nodes (head and one more), 2 logical CPUs each; one driver connection for the module."""
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster: no token file written
    made = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    made.add_node(num_cpus=2)
    made.wait_for_nodes()
    ray.init(address=made.address, namespace="pi0_reward_server_tests", log_to_driver=False)
    yield made
    ray.shutdown()
    made.shutdown()


def wait_for(predicate, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def ray_workers(cluster, title: str) -> list[int]:
    """Pids of this cluster's Ray worker processes whose title names ``title`` (Ray titles a busy worker
    ``ray::<function>``): descendants of its nodes' raylets only, never another cluster's on the machine."""
    import psutil

    pids = []
    for node in cluster.list_all_nodes():
        for raylet in node.all_processes.get("raylet", []):
            try:
                children = psutil.Process(raylet.process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for child in children:
                try:
                    cmdline = child.cmdline()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                if cmdline and cmdline[0].startswith("ray::") and title in cmdline[0]:
                    pids.append(child.pid)
    return pids


def gated_server_args(tmp_path: pathlib.Path, name: str) -> tuple[list[str], pathlib.Path]:
    """A CPU model server whose affine model holds each request until a gate file appears."""
    entered = tmp_path / f"{name}.entered"
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps({"shutdown_grace_s": 1, "log_level": "WARNING", "models": [
        {"name": "affine", "target": "gpu_worker.models.testing:AffineModel",
         "options": {"gate_file": str(tmp_path / f"{name}.gate"), "entered_file": str(entered)}}]}))
    return ["--config", str(config)], entered


def test_server_actors_join_the_pool_and_serve_score(cluster, start_server, serve_app):
    from pi0_reward_server.scale.ray_servers import AppRegistrar, launch_servers

    configured = start_server(models=(CARTPOLE,), log_level="WARNING")
    app = serve_app(model_servers=(configured.url,), token=TOKEN, membership_interval_s=0.2)
    pool = app.app.extensions["client_pool"]
    group = launch_servers(2, num_gpus=0, num_cpus=0.25, registrar=AppRegistrar(app.url, TOKEN),
                           server_args=["--model", "cartpole=gpu_worker.models.cartpole:CartPolePolicy",
                                        "--log-level", "WARNING"])
    try:
        assert len(set(group.urls)) == 2 and set(group.urls) <= set(pool.urls)
        assert {s["node_id"] for s in group.servers} <= {n["NodeID"] for n in ray.nodes()}
        wait_for(lambda: pool.healthy_servers == 3, what="the actors' servers to come up")
        client = app.app.test_client()
        shown = {s["url"]: s for s in client.get("/pool_status", headers=AUTH).get_json()["servers"]}
        for server in group.servers:
            where = shown[server["url"]]["where"]
            assert where["source"] == "ray" and where["node_id"] == server["node_id"] and where["actor_id"]

        # Only the actors left: the configured server is removed by hand, /score is served by the actors.
        assert client.delete("/admin/pool/servers", json={"url": configured.url}, headers=AUTH).status_code == 200
        body = client.post("/score", headers=AUTH, json={
            "responses": [{"task": "cartpole_short", "seed": s, "episodes": 2} for s in range(4)]}).get_json()
        assert body["failures"] == 0 and body["scores"] == [1.0] * 4, body
        assert {url for d in body["details"] for url in d["servers"]} <= set(group.urls)
    finally:
        group.stop(grace_s=5)
    assert group.servers == [] and pool.urls == []  # each deregistered itself as it stopped


def test_a_server_actor_killed_mid_request_fails_over_and_leaves_the_pool(cluster, tmp_path, pools):
    from pi0_reward_server.scale.ray_servers import PoolRegistrar, launch_servers

    held_args, entered = gated_server_args(tmp_path, "held")
    pool = pools([], allow_empty=True, retries=2, request_timeout_s=30)
    registrar = PoolRegistrar(pool)
    held = launch_servers(1, num_gpus=0, num_cpus=0.25, server_args=held_args, registrar=registrar)
    free = launch_servers(1, num_gpus=0, num_cpus=0.25, registrar=registrar, server_args=[
        "--model", "affine=gpu_worker.models.testing:AffineModel", "--log-level", "WARNING"])
    try:
        assert pool.wait_for_servers(2, 30)
        [held_url], [free_url] = held.urls, free.urls
        held_pid = held.servers[0]["pid"]
        reply: dict = {}
        thread = threading.Thread(target=lambda: reply.update(zip(("action", "url"), pool.infer(
            {"observation/state": np.array([1.0, 2.0], np.float32)}, prefer=held_url))))
        thread.start()
        wait_for(entered.exists, what="the request to enter the held server's model")
        ray.kill(held.actor(held_url))  # the actor dies mid-request; its server process goes with it
        thread.join(30)
        assert reply["url"] == free_url and np.allclose(reply["action"]["actions"], [3.0, 5.0])
        assert held.check() == [held_url]  # the launcher notices and deregisters it
        assert pool.urls == [free_url]
        wait_for(lambda: not pathlib.Path(f"/proc/{held_pid}").exists()
                 or pathlib.Path(f"/proc/{held_pid}/stat").read_text().split()[2] == "Z",
                 what="the killed actor's server process to exit")
    finally:
        held.stop(grace_s=2)
        free.stop(grace_s=2)


def test_a_server_whose_process_died_is_deregistered_and_its_actor_killed(cluster, pools):
    from pi0_reward_server.scale.ray_servers import PoolRegistrar, launch_servers

    pool = pools([], allow_empty=True)
    group = launch_servers(1, num_gpus=0, num_cpus=0.25, registrar=PoolRegistrar(pool), server_args=[
        "--model", "affine=gpu_worker.models.testing:AffineModel", "--log-level", "WARNING"])
    try:
        [url] = group.urls
        actor = group.actor(url)
        os.kill(group.servers[0]["pid"], signal.SIGKILL)  # the server dies; its actor lives on
        wait_for(lambda: not ray.get(actor.alive.remote()), what="the actor to see its server gone")
        assert group.check() == [url] and pool.urls == []

        def actor_dead() -> bool:
            try:
                ray.get(actor.alive.remote(), timeout=10)
            except ray.exceptions.RayActorError:
                return True
            return False

        wait_for(actor_dead, what="the actor to be killed (its reservation given back)")
    finally:
        group.stop(grace_s=2)


def test_a_launch_whose_registration_fails_leaves_nothing_registered_or_running(cluster):
    import psutil

    from pi0_reward_server.scale.ray_servers import launch_servers

    class FailsOnSecond:
        def __init__(self) -> None:
            self.added: list[dict] = []
            self.removed: list[str] = []

        def add(self, url, where):
            if self.added:
                raise RuntimeError("the app refused the second server")
            self.added.append(where)

        def remove(self, url):
            self.removed.append(url)

    registrar = FailsOnSecond()
    with pytest.raises(RuntimeError, match="refused the second server"):
        launch_servers(2, num_gpus=0, num_cpus=0.25, registrar=registrar, server_args=[
            "--model", "affine=gpu_worker.models.testing:AffineModel", "--log-level", "WARNING"])
    [first] = registrar.added
    assert registrar.removed == [first["url"]]
    try:  # its actor was killed, so its server process gets SIGTERM and ends
        psutil.Process(first["pid"]).wait(30)
    except psutil.NoSuchProcess:
        pass


def test_a_long_job_on_ray_follows_membership_at_each_task(cluster, start_server):
    """The URLs are read at each submission, not once per job: a server that joins mid-job gets the tasks
    submitted after it joined."""
    from pi0_reward_server.kinds.base import Limits
    from pi0_reward_server.kinds.registry import parse_task
    from pi0_reward_server.scale.ray_rollouts import RayRunner

    before = start_server(models=(CARTPOLE,), log_level="WARNING")
    after = start_server(models=(CARTPOLE,), log_level="WARNING")
    reads: list[int] = []

    def urls() -> list[str]:
        reads.append(1)
        return [before.url] if len(reads) == 1 else [after.url]

    tasks = [parse_task(i, {"task": "cartpole_short", "seed": i, "episodes": 1}, {}, Limits()) for i in range(2)]
    runner = RayRunner(urls=urls, pool_options={}, failure_score=-1.0, task_cpus=1)
    results = runner.run(tasks, 2, time.monotonic() + 120, None, None)
    assert [r.error for r in results] == [None, None], results
    assert results[0].servers == [before.url] and results[1].servers == [after.url]


def test_a_task_its_ray_worker_cannot_prepare_says_so(cluster):
    """Not 'the Ray worker running it was lost': the worker lives; it could not set the task up."""
    from pi0_reward_server.kinds.base import Limits
    from pi0_reward_server.kinds.registry import parse_task
    from pi0_reward_server.scale.ray_rollouts import RayRunner

    task = parse_task(0, {"task": "cartpole_short", "seed": 0, "episodes": 1}, {}, Limits())
    runner = RayRunner(urls=lambda: ["http://not-a-model-server:80"], pool_options={}, failure_score=-1.0)
    [result] = runner.run([task], 1, time.monotonic() + 120, None, None)
    assert result.score == -1.0 and "could not prepare the task" in result.error
    assert "must look like ws://host:port" in result.error
    assert "was lost" not in result.error


def test_server_urls_put_ipv6_addresses_in_brackets():
    from pi0_reward_server.client_pool import check_server_url
    from pi0_reward_server.scale.ray_servers import _ws_url

    assert _ws_url("10.0.0.2", 8000) == "ws://10.0.0.2:8000"
    assert check_server_url(_ws_url("fd00::2", 8000)) == "ws://[fd00::2]:8000"


def score(app, responses, **kwargs):
    body = app.test_client().post("/score", json={"responses": responses, "reward_function_kwargs": kwargs})
    assert body.status_code == 200, body.get_json()
    return body.get_json()


COMPARED = ("score", "episodes", "successes", "mean_return", "steps", "error")


def test_rollouts_in_ray_mode_score_as_the_thread_mode(cluster, start_server, make_app):
    server = start_server(models=(CARTPOLE, CONNECT4), log_level="WARNING")
    responses = [{"task": "cartpole_short", "seed": s, "episodes": 3} for s in range(3)]
    responses += [{"env": "CartPole-v1", "seed": 11, "episodes": 2, "max_steps": 40, "return_range": [0, 100]}]
    responses += [{"kind": "selfplay", "game": "connect4", "model": "connect4", "opponent": "mcts", "games": 2,
                   "simulations": 8, "seed": 3}]
    local = score(make_app(model_servers=(server.url,)), responses, cache=False)
    on_ray = score(make_app(model_servers=(server.url,), execution="ray", ray_address=cluster.address),
                   responses, cache=False)
    assert on_ray["failures"] == 0 and on_ray["scores"] == local["scores"]
    for mine, theirs in zip(on_ray["details"], local["details"]):
        assert {k: mine.get(k) for k in COMPARED} == {k: theirs.get(k) for k in COMPARED}
        assert mine["ray_node"] in {n["NodeID"] for n in ray.nodes()}
    assert local["details"][-1]["games"] == 2 and on_ray["details"][-1].get("games") == 2


def test_libero_in_ray_mode_scores_as_the_process_mode(cluster, start_server, make_app):
    from pi0_reward_server.kinds import libero as libero_backend

    if not libero_backend.available():
        if os.environ.get("CI"):
            raise RuntimeError("CI must install the libero extra (scripts/install_libero.sh)")
        pytest.skip("the libero extra is not installed")
    server = start_server(models=(ModelConfig.parse("libero_tiny=gpu_worker.models.libero_tiny:LiberoTinyPolicy"),),
                          log_level="WARNING")
    responses = [{"kind": "libero", "suite": "libero_spatial", "task_id": 0, "episodes": 1, "max_steps": 6,
                  "model": "libero_tiny", "seed": 7}]
    by_process = score(make_app(model_servers=(server.url,), libero_processes=1), responses, cache=False)
    on_ray = score(make_app(model_servers=(server.url,), execution="ray", ray_address=cluster.address),
                   responses, cache=False)
    assert on_ray["failures"] == 0 and on_ray["scores"] == by_process["scores"]
    assert ({k: on_ray["details"][0].get(k) for k in COMPARED}
            == {k: by_process["details"][0].get(k) for k in COMPARED})


def test_a_ray_worker_killed_mid_task_still_gives_exactly_one_result(cluster, start_server):
    from pi0_reward_server.kinds.base import Limits
    from pi0_reward_server.kinds.registry import parse_task
    from pi0_reward_server.scale.ray_rollouts import RayRunner

    server = start_server(models=(CARTPOLE,), log_level="WARNING")
    # The shipped policy holds the pole all 500 steps: a task long enough to be caught running.
    tasks = [parse_task(i, {"task": "cartpole", "seed": i, "episodes": 2}, {}, Limits()) for i in range(2)]
    runner = RayRunner(urls=lambda: [server.url], pool_options={}, failure_score=-1.0, task_cpus=1)
    reported: list[int] = []
    killed: list[int] = []

    def kill_one_running() -> None:
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            running = ray_workers(cluster, "run_remote")
            if running:
                os.kill(running[0], signal.SIGKILL)  # as the OOM killer would
                killed.append(running[0])
            time.sleep(0.01)

    killer = threading.Thread(target=kill_one_running)
    killer.start()
    results = runner.run(tasks, 2, time.monotonic() + 120, None, lambda i, result: reported.append(i))
    killer.join()
    assert killed, "no Ray worker was caught running a task"
    assert sorted(reported) == [0, 1]  # one result per task, the retried one included
    assert all(r.error is None and r.score == 1.0 and r.episodes == 2 for r in results), results
    assert killed[0] not in {r.extra["ray_worker_pid"] for r in results}  # the killed one's task ran again


def test_cancelling_a_job_stops_its_ray_tasks(cluster, start_server, make_app):
    server = start_server(models=(CARTPOLE,), log_level="WARNING")
    app = make_app(model_servers=(server.url,), execution="ray", ray_address=cluster.address)
    client = app.test_client()
    many = [{"task": "cartpole", "seed": s, "episodes": 50} for s in range(6)]
    created = client.post("/jobs", json={"responses": many, "reward_function_kwargs": {"max_workers": 2,
                                                                                        "cache": False}})
    assert created.status_code == 202
    job_id = created.get_json()["id"]
    wait_for(lambda: ray_workers(cluster, "run_remote"), what="the job's Ray tasks to start")
    assert client.delete(f"/jobs/{job_id}").get_json()["state"] == "cancelled"
    wait_for(lambda: client.get(f"/jobs/{job_id}").get_json().get("result") is not None, 30, "the job to end")
    wait_for(lambda: not ray_workers(cluster, "run_remote"), 15, "the Ray tasks to stop")
    result = client.get(f"/jobs/{job_id}").get_json()["result"]
    assert len(result["details"]) == len(many)
    assert all(d["error"] and "JobCancelled" in d["error"] for d in result["details"]), result["details"]


def test_the_launcher_cli_registers_servers_and_deregisters_them_on_sigterm(cluster, serve_app, start_server):
    import subprocess
    import sys

    from conftest import ROOT

    configured = start_server(models=(CARTPOLE,), log_level="WARNING")
    app = serve_app(model_servers=(configured.url,), token=TOKEN, membership_interval_s=0.2)
    pool = app.app.extensions["client_pool"]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "pi0_reward_server.scale", "servers", "--address", cluster.address,
         "--cpu-servers", "1", "--cpus-per-server", "0.25", "--app-url", app.url, "--grace-s", "2", "--",
         "--model", "cartpole=gpu_worker.models.cartpole:CartPolePolicy", "--log-level", "WARNING"],
        cwd=ROOT, env={**os.environ, "REWARD_SERVER_TOKEN": TOKEN}, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True)
    try:
        line = launcher.stdout.readline()
        assert line, "the launcher printed no server"
        server = json.loads(line)
        assert server["source"] == "ray" and server["url"] in pool.urls
        wait_for(lambda: pool.healthy_servers == 2, what="the launched server to come up")
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(60) == 0
        assert pool.urls == [configured.url]
        wait_for(lambda: not pathlib.Path(f"/proc/{server['pid']}").exists()
                 or pathlib.Path(f"/proc/{server['pid']}/stat").read_text().split()[2] == "Z",
                 what="the launched server process to exit")
    finally:
        if launcher.poll() is None:
            launcher.kill()


@pytest.mark.parametrize("argv, message", [
    (["servers", "--gpu-servers", "1", "--cpu-servers", "1"], "not both"),
    (["servers", "--cpu-servers", "0"], "--cpu-servers must be between 1 and 4096"),
    (["servers", "--cpus-per-server", "-1"], "--cpus-per-server must be in (0, 1024]"),
    (["servers", "--app-url", "app:6006"], "must start with http:// or https://"),
    (["servers", "--app-url", "http://app:6006", "--token-env", "NO_SUCH_TOKEN_VAR"], "$NO_SUCH_TOKEN_VAR"),
    (["servers", "--name", "gpu-nodes"], "--name registers with an app: give --app-url too"),
])
def test_the_launcher_cli_names_bad_flags(argv, message, capsys):
    from pi0_reward_server.scale.__main__ import parse

    with pytest.raises(SystemExit) as exited:
        parse(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_launch_servers_refuses_what_it_cannot_do(cluster):
    from pi0_reward_server.scale.ray_servers import launch_servers

    with pytest.raises(ValueError, match=r"must not set \['--port'\]"):
        launch_servers(1, num_gpus=0, server_args=["--port", "8000"])
    with pytest.raises(RuntimeError, match="the Ray cluster has no GPU"):
        launch_servers(num_gpus=1)
    with pytest.raises(ValueError, match="count must be a positive integer"):
        launch_servers(0, num_gpus=0)


def test_the_ray_benchmark_runs_and_writes_json(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "ray.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_ray.py"), "--gym-tasks", "2",
                             "--libero-tasks", "0", "--cpus", "1", "--overhead-tasks", "2", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert [(r["kind"], r["mode"]) for r in figures["rows"]] == [("gym", "thread"), ("gym", "ray")]
    assert all(r["tasks_per_s"] > 0 for r in figures["rows"]) and figures["overhead_per_task_ms"]["samples"] == 2
    assert figures["cluster_estimate"]["assumptions"] and "shared" in figures["machine"]


def test_an_app_with_no_ray_address_starts_its_own_ray_and_shuts_it_down(tmp_path):
    """The default ray_address (empty): the app process starts a Ray instance of its own on first use and
    stops it when closed. In a fresh process, away from the module's cluster."""
    import subprocess
    import sys

    from conftest import ROOT

    script = """
import json, ray
from gpu_worker.config import ServerConfig, ModelConfig
from gpu_worker.server import ServerThread
from pi0_reward_server.app import create_app
server = ServerThread(ServerConfig(port=0, log_level="WARNING", models=(
    ModelConfig.parse("cartpole=gpu_worker.models.cartpole:CartPolePolicy"),))).start()
app = create_app({"model_servers": (server.url,), "execution": "ray", "ray_num_cpus": 1, "log_level": "WARNING"})
body = app.test_client().post("/score", json={"responses": ["cartpole_short"],
                                              "reward_function_kwargs": {"episodes": 2}}).get_json()
[runner] = app.extensions["libero_runners"]
started = runner._started_ray and ray.cluster_resources().get("CPU")
app.extensions["job_runner"].close()
for runner in app.extensions["libero_runners"]:
    runner.close()
app.extensions["client_pool"].close()
server.stop(grace_s=1)
print(json.dumps({"scores": body["scores"], "node": body["details"][0].get("ray_node") is not None,
                  "cpus": started, "after": ray.is_initialized()}))
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # set by the module's ray.init
    env["REWARD_DATA_DIR"] = str(tmp_path / "data")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"scores": [1.0], "node": True, "cpus": 1.0,
                                                                  "after": False}
