"""The LIBERO backend: openpi's observation, success detection, determinism, /score end to end.

Needs the 'libero' extra (scripts/install_libero.sh; scripts/test.sh installs it). Rendering is
software OpenGL here, ~0.3-0.6 s a step, so episodes are capped at a few steps.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from gpu_worker.config import ModelConfig
from pi0_reward_server.kinds import libero as libero_backend

if not libero_backend.available():
    if os.environ.get("CI"):
        raise RuntimeError("CI must install the libero extra (scripts/install_libero.sh)")
    pytest.skip("the libero extra is not installed (scripts/install_libero.sh)", allow_module_level=True)

pytestmark = pytest.mark.slow
LIBERO_TINY = ModelConfig.parse("libero_tiny=gpu_worker.models.libero_tiny:LiberoTinyPolicy")
OPENPI_KEYS = {
    "observation/image": ((224, 224, 3), np.uint8),
    "observation/wrist_image": ((224, 224, 3), np.uint8),
    "observation/state": ((8,), np.float32),
}


def settled_env(suite: str = "libero_spatial", task_id: int = 0, seed: int = 7, init_state: int = 0):
    task, init_states, bddl = libero_backend.load_task(suite, task_id)
    env = libero_backend.make_env(bddl, seed)
    env.reset()
    obs = env.set_init_state(init_states[init_state])
    for _ in range(libero_backend.SETTLE_STEPS):
        obs, _, done, _ = env.step(libero_backend.DUMMY_ACTION)
    return task, env, obs


def test_one_capped_episode_through_gpu_worker_sends_openpis_observation(start_server):
    from pi0_reward_server.client_pool import ClientPool
    from pi0_reward_server.policies import PoolPolicy

    server = start_server(models=(LIBERO_TINY,), log_level="WARNING")
    sent: list[dict] = []
    with ClientPool([server.url]).start(wait_s=10) as pool:
        class Recording(PoolPolicy):
            def infer_batch(self, observations):
                sent.extend(observations)
                return super().infer_batch(observations)

        task = libero_backend.LiberoTask(name="t", suite="libero_spatial", task_id=0, episodes=1, seed=7,
                                         init_state=0, max_steps=6, prompt=None, model="libero_tiny")
        result = libero_backend.run(task, lambda model: Recording(pool, model))
    assert result.error is None and result.episodes == 1 and result.successes == 0  # random weights
    assert result.steps == libero_backend.SETTLE_STEPS + 6
    assert len(sent) == 2  # replanned after 5 executed actions
    obs = sent[0]
    assert set(obs) == {*OPENPI_KEYS, "prompt"}  # exactly openpi's keys (the pool adds only __model__)
    for key, (shape, dtype) in OPENPI_KEYS.items():
        assert obs[key].shape == shape and obs[key].dtype == dtype, key
    assert obs["prompt"] == "pick up the black bowl between the plate and the ramekin and place it on the plate"
    assert result.servers == [server.url]


def test_success_is_detected_when_the_bowl_is_on_the_plate():
    _, env, _ = settled_env()
    try:
        inner, sim = env.env, env.env.sim
        assert inner.parsed_problem["goal_state"] == [["on", "akita_black_bowl_1", "plate_1"]]
        _, _, done, _ = env.step(libero_backend.DUMMY_ACTION)
        assert not done
        joint = inner.get_object("akita_black_bowl_1").joints[0]
        plate = sim.data.body_xpos[inner.obj_body_id["plate_1"]].copy()
        qpos = sim.data.get_joint_qpos(joint).copy()  # free joint: x y z qw qx qy qz
        qpos[:2], qpos[2] = plate[:2], plate[2] + 0.03
        sim.data.set_joint_qpos(joint, qpos)
        sim.data.set_joint_qvel(joint, np.zeros(6))
        sim.forward()
        for _ in range(15):
            _, reward, done, _ = env.step(libero_backend.DUMMY_ACTION)
            if done:
                break
        assert done and reward == 1.0
    finally:
        env.close()


def test_same_seed_and_init_state_give_the_same_first_observation():
    firsts = []
    for _ in range(2):
        task, env, obs = settled_env(seed=7, init_state=3)
        try:
            firsts.append(libero_backend.observation(obs, task.language))
        finally:
            env.close()
    for key in OPENPI_KEYS:
        np.testing.assert_array_equal(firsts[0][key], firsts[1][key])


def test_quat2axisangle_matches_known_rotations():
    half = np.sqrt(0.5)
    np.testing.assert_allclose(libero_backend.quat2axisangle(np.array([0, 0, half, half])), [0, 0, np.pi / 2], atol=1e-9)
    np.testing.assert_allclose(libero_backend.quat2axisangle(np.array([0, 0, 0, 1.0])), [0, 0, 0])


@pytest.mark.parametrize("execution", ["process", "thread"])
def test_score_libero_end_to_end(start_server, execution):
    from pi0_reward_server.app import create_app

    server = start_server(models=(LIBERO_TINY,), log_level="WARNING")
    app = create_app({"model_servers": (server.url,), "log_level": "WARNING", "libero_execution": execution,
                      "libero_processes": 1})
    try:
        client = app.test_client()
        spec = {"kind": "libero", "suite": "libero_spatial", "task_id": 0, "episodes": 1, "max_steps": 3,
                "model": "libero_tiny", "prompt": "put the bowl on the plate"}
        response = client.post("/score", json={"responses": [spec, "libero:libero_object:2"],
                                               "reward_function_kwargs": {"episodes": 1, "max_steps": 3,
                                                                          "model": "libero_tiny"}})
        body = response.get_json()
        assert response.status_code == 200, body
        assert body["failures"] == 0 and body["scores"] == [0.0, 0.0]
        first, second = body["details"]
        assert first["prompt"] == "put the bowl on the plate" and first["steps"] == libero_backend.SETTLE_STEPS + 3
        assert second["task"]["suite"] == "libero_object" and second["task"]["task_id"] == 2
        for spec, message in [
            ({"kind": "libero", "suite": "libero_100", "task_id": 0}, "unknown LIBERO suite 'libero_100'"),
            ({"kind": "libero", "suite": "libero_spatial", "task_id": 10}, "task_id: must be an integer between 0 and 9"),
            ("libero:libero_90:90", "task_id: must be an integer between 0 and 89"),
            ("libero:spatial", "must look like 'libero:<suite>:<task_id>'"),
            ({"kind": "libero", "suite": "libero_goal", "task_id": 1, "games": 2}, "do not apply to libero tasks"),
        ]:
            bad = client.post("/score", json={"responses": [spec]})
            assert bad.status_code == 400 and message in bad.get_json()["error"], (spec, bad.get_json())
    finally:
        app.extensions["client_pool"].close()
        for runner in app.extensions["libero_runners"]:
            runner.close()


def test_a_dead_worker_process_is_replaced(start_server):
    server = start_server(models=(LIBERO_TINY,), log_level="WARNING")
    from pi0_reward_server.jobs.processes import ProcessRunner

    runner = ProcessRunner([server.url], {"connections_per_server": 1}, processes=1)
    task = libero_backend.LiberoTask(name="t", suite="libero_spatial", task_id=0, episodes=1, seed=7, init_state=0,
                                     max_steps=1, prompt=None, model="libero_tiny")
    try:
        import time

        first = runner.run(task, time.monotonic() + 300, 300, 0.0)
        assert first.error is None and first.steps == libero_backend.SETTLE_STEPS + 1
        for process in list(runner._executor._processes.values()):
            process.kill()  # as the OOM killer would
            process.join(10)
        second = runner.run(task, time.monotonic() + 300, 300, 0.0)
        assert second.error is None and second.steps == libero_backend.SETTLE_STEPS + 1
    finally:
        runner.close()


def test_score_libero_against_an_openpi_server_equals_gpu_worker(start_server, monkeypatch):
    """openpi's server takes one observation map per frame; CUDA_VISIBLE_DEVICES='' hides GPUs (the
    worker processes inherit it and must still render)."""
    from conftest import close_app
    from openpi_style_server import OpenpiStyleServer

    from pi0_reward_server.app import create_app

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    gpu = start_server(models=(LIBERO_TINY,), log_level="WARNING")
    openpi = OpenpiStyleServer(model=LIBERO_TINY.target).start()
    body = {"responses": [{"kind": "libero", "suite": "libero_spatial", "task_id": 0, "episodes": 2, "max_steps": 6,
                           "seed": 7, "model": "libero_tiny"}]}
    details = []
    try:
        for url in (gpu.url, openpi.url):
            app = create_app({"model_servers": (url,), "log_level": "WARNING", "libero_processes": 1})
            try:
                response = app.test_client().post("/score", json=body)
            finally:
                close_app(app)  # its worker process goes now, not at the end of the test
            payload = response.get_json()
            assert response.status_code == 200 and payload["failures"] == 0, payload
            details.append({k: v for k, v in payload["details"][0].items() if k not in ("servers", "seconds")})
    finally:
        openpi.stop()
    # gpu_worker names the model version of every reply; openpi's server names none.
    assert details[0].pop("model_versions") == ["libero_tiny@init"] and "model_versions" not in details[1]
    assert details[0] == details[1]
    assert details[1]["episodes"] == 2 and details[1]["steps"] == 2 * (libero_backend.SETTLE_STEPS + 6)
    assert openpi.requests == 4 and openpi.frames_refused == 0 and openpi.model_keys_seen == 0


def test_render_check_and_environments_work_with_cuda_visible_devices_empty():
    """robosuite's EGL setup parses CUDA_VISIBLE_DEVICES as device indices; '' (GPUs hidden) must still work."""
    import subprocess
    import sys

    from conftest import ROOT

    script = ("from pi0_reward_server.kinds import libero as lb\n"
              "backend = lb.render_check()\n"
              "_, _, bddl = lb.load_task('libero_spatial', 0)\n"
              "env = lb.make_env(bddl, 0); env.reset(); env.close()\n"
              "print('rendered with', backend)\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM", "MUJOCO_EGL_DEVICE_ID", "CUDA_VISIBLE_DEVICES")}
    unset = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert unset.returncode == 0, unset.stderr[-3000:]
    backend = unset.stdout.split("rendered with")[-1].strip()  # EGL where it works, else OSMesa
    for visible in ("", " "):
        done = subprocess.run([sys.executable, "-c", script], env={**env, "CUDA_VISIBLE_DEVICES": visible},
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.split("rendered with")[-1].strip() == backend  # the same backend: EGL did not fail


def test_libero_worker_processes_follow_the_pool_membership(start_server, make_app):
    """A server added through the admin route gets LIBERO traffic from the worker processes, and one removed
    gets none: the workers take the app's current membership with each task, not the configured list."""
    configured = start_server(models=(LIBERO_TINY,), log_level="WARNING")
    joined = start_server(models=(LIBERO_TINY,), log_level="WARNING")
    auth = {"Authorization": "Bearer libero-membership"}
    app = make_app(model_servers=(configured.url,), token="libero-membership", libero_processes=1)
    client = app.test_client()
    spec = {"kind": "libero", "suite": "libero_spatial", "task_id": 0, "episodes": 1, "max_steps": 2,
            "model": "libero_tiny", "seed": 7}

    def servers_used() -> list[str]:
        body = client.post("/score", headers=auth, json={"responses": [spec],
                                                         "reward_function_kwargs": {"cache": False}}).get_json()
        assert body.get("failures") == 0, body
        return body["details"][0]["servers"]

    assert servers_used() == [configured.url]  # the worker process starts (and holds its pool) now
    assert client.post("/admin/pool/servers", json={"url": joined.url}, headers=auth).status_code == 201
    assert client.delete("/admin/pool/servers", json={"url": configured.url}, headers=auth).status_code == 200
    assert app.extensions["client_pool"].wait_for_servers(1, 30)  # the app admits work once one is up
    assert servers_used() == [joined.url]
