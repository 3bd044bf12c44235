"""A real LeRobot policy (SmolVLA, unmodified LeRobot and transformers code, random weights) hosted by
gpu_worker: the unmodified openpi-client, dynamic batches, batch-invariant seeded noise, a LIBERO task
scored end to end, and the errors a user gets for a checkpoint that cannot load offline.

Needs the 'lerobot' extra (scripts/install_lerobot.sh; scripts/test.sh installs it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import ROOT
from gpu_worker.config import ModelConfig
from gpu_worker.model import ModelLoadError, load_model

if importlib.util.find_spec("lerobot") is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must install the lerobot extra (scripts/install_lerobot.sh)")
    pytest.skip("the lerobot extra is not installed (scripts/install_lerobot.sh)", allow_module_level=True)

pytestmark = pytest.mark.slow
TARGET = "gpu_worker.models.lerobot:LeRobotPolicy"
HERE = pathlib.Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("lerobot") / "smolvla_tiny"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_smolvla.py"), str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def libero_obs(rows: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    prompts = ["put the bowl on the plate", "open the top drawer and put the bowl inside", "turn on the stove"]
    return [{"observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
             "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
             "observation/state": rng.normal(size=8).astype(np.float32),
             "prompt": prompts[i % len(prompts)]} for i in range(rows)]


def smolvla(checkpoint: pathlib.Path, **options) -> ModelConfig:
    return ModelConfig(name="smolvla", target=TARGET, checkpoint=str(checkpoint), options=options)


def test_the_unmodified_openpi_client_infers_from_a_served_smolvla(cli_server, checkpoint):
    python = os.environ.get("OPENPI_CLIENT_PYTHON", "")
    if not python or not pathlib.Path(python).exists():
        if os.environ.get("CI"):
            pytest.fail("OPENPI_CLIENT_PYTHON must point at a venv with openpi-client (scripts/install.sh makes one)")
        pytest.skip("set OPENPI_CLIENT_PYTHON to a python with openpi-client installed")
    server = cli_server("--model", f"smolvla={TARGET}@{checkpoint}")
    server.wait_healthy(120)
    result = subprocess.run([python, str(HERE / "openpi_client_check.py"), "127.0.0.1", str(server.port)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["metadata_model"] == "smolvla" and seen["action_horizon"] == 10
    assert seen["actions_shape"] == [10, 7] and seen["actions_dtype"] == "<f4"
    assert "observation is missing key(s)" in seen["error"]
    assert seen["same_after_error"]  # seeded noise: the same observation gives the same actions


def test_concurrent_clients_form_batches_equal_to_one_at_a_time(start_server, checkpoint):
    from gpu_worker.client import ModelClient

    server = start_server(models=(smolvla(checkpoint),), log_level="WARNING", max_wait_ms=20)
    observations = libero_obs(16, seed=1)
    with ModelClient(server.url, timeout=120) as client:
        alone = [client.infer(obs) for obs in observations]  # one at a time: batches of one
        batch = client.infer_batch(observations)  # one explicit batch frame of 16
    assert {r["server_timing"]["batch_size"] for r in alone} == {1}
    replies: list = [None] * len(observations)
    barrier = threading.Barrier(len(observations))
    errors: list = []

    def call(i: int) -> None:
        try:
            with ModelClient(server.url, timeout=120) as client:
                barrier.wait(30)
                replies[i] = client.infer(observations[i])
        except BaseException as exc:  # noqa: BLE001 - a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(observations))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert max(r["server_timing"]["batch_size"] for r in replies) > 1  # concurrent clients shared forward passes
    for one, in_batch, concurrent in zip(alone, batch, replies):
        np.testing.assert_allclose(in_batch["actions"], one["actions"], atol=1e-4)
        np.testing.assert_allclose(concurrent["actions"], one["actions"], atol=1e-4)
    assert np.abs(alone[0]["actions"] - alone[1]["actions"]).max() > 1e-2  # different inputs, different actions


def test_a_fixed_seed_reproduces_and_another_seed_differs(checkpoint):
    rows = libero_obs(4, seed=2)
    batch = {key: np.stack([np.asarray(r[key]) for r in rows]) for key in rows[0]}
    first = load_model(TARGET, str(checkpoint), device="cpu", options={"seed": 7}).infer_batch(batch)["actions"]
    again = load_model(TARGET, str(checkpoint), device="cpu", options={"seed": 7}).infer_batch(batch)["actions"]
    other = load_model(TARGET, str(checkpoint), device="cpu", options={"seed": 8}).infer_batch(batch)["actions"]
    fewer_steps = load_model(TARGET, str(checkpoint), device="cpu",
                             options={"seed": 7, "num_steps": 3}).infer_batch(batch)["actions"]
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-2 and np.abs(first - fewer_steps).max() > 1e-3
    bf16 = load_model(TARGET, str(checkpoint), device="cpu", options={"seed": 7, "dtype": "bfloat16"})
    np.testing.assert_allclose(bf16.infer_batch(batch)["actions"], first, atol=0.1)


def test_a_libero_task_is_scored_end_to_end_with_the_served_policy(start_server, make_app, checkpoint):
    from pi0_reward_server.kinds import libero as libero_backend

    if not libero_backend.available():
        pytest.skip("the libero extra is not installed (scripts/install_libero.sh)")
    server = start_server(models=(smolvla(checkpoint),), log_level="WARNING")
    app = make_app(model_servers=(server.url,), libero_processes=1)
    response = app.test_client().post("/score", json={"responses": [
        {"kind": "libero", "suite": "libero_spatial", "task_id": 0, "episodes": 1, "max_steps": 6,
         "model": "smolvla"}]})
    body = response.get_json()
    assert response.status_code == 200 and body["failures"] == 0, body
    detail = body["details"][0]
    assert detail["episodes"] == 1 and detail["steps"] == libero_backend.SETTLE_STEPS + 6
    assert detail["servers"] == [server.url]


def test_a_moved_checkpoint_still_loads(checkpoint, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(checkpoint, moved)
    config = json.loads((moved / "config.json").read_text())
    config["vlm_model_name"] = str(tmp_path / "gone")  # the absolute path baked in at save time no longer exists
    (moved / "config.json").write_text(json.dumps(config))
    policy = load_model(TARGET, str(moved), device="cpu")
    rows = libero_obs(1)
    assert policy.infer_batch({k: np.stack([np.asarray(rows[0][k])]) for k in rows[0]})["actions"].shape == (1, 10, 7)


@pytest.mark.parametrize("case, expected", [
    ("no checkpoint", "LeRobotPolicy needs a checkpoint directory"),
    ("missing files", "lacks ['model.safetensors', 'policy_postprocessor.json']"),
    ("hub VLM", "huggingface-cli download HuggingFaceTB/SmolVLM2-500M-Video-Instruct --local-dir DIR"),
    ("bad key map", "key_map names ['observation.images.top']"),
    ("uncovered feature", "the policy needs ['observation.images.wrist_image'], which no key_map entry feeds"),
    ("bad dtype", "dtype must be 'float32' or 'bfloat16'"),
])
def test_checkpoints_that_cannot_load_offline_say_what_to_fix(checkpoint, tmp_path, case, expected):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    options: dict = {}
    path: str | None = str(broken)
    if case == "no checkpoint":
        path = None
    elif case == "missing files":
        (broken / "model.safetensors").unlink()
        (broken / "policy_postprocessor.json").unlink()
    elif case == "hub VLM":
        config = json.loads((broken / "config.json").read_text())
        config["vlm_model_name"] = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"  # as a hub checkpoint has it
        (broken / "config.json").write_text(json.dumps(config))
        shutil.rmtree(broken / "vlm")
    elif case == "bad key map":
        options["key_map"] = {"observation/image": "observation.images.top"}
    elif case == "uncovered feature":
        options["key_map"] = {"observation/image": "observation.images.image", "observation/state": "observation.state"}
    elif case == "bad dtype":
        options["dtype"] = "float8"
    with pytest.raises(ModelLoadError) as info:
        load_model(TARGET, path, device="cpu", options=options)
    assert expected in str(info.value)
