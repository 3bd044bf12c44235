"""The unmodified openpi-client from PyPI against our server (in its own venv: it pins numpy<2)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import numpy as np
import pytest

from gpu_worker.config import ModelConfig
from gpu_worker.model import load_model

HERE = pathlib.Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def openpi_python() -> str:
    python = os.environ.get("OPENPI_CLIENT_PYTHON", "")
    if not python or not pathlib.Path(python).exists():
        if os.environ.get("CI"):
            pytest.fail("OPENPI_CLIENT_PYTHON must point at a venv with openpi-client (scripts/install.sh makes one)")
        pytest.skip("set OPENPI_CLIENT_PYTHON to a python with openpi-client installed (scripts/install.sh)")
    return python


def test_openpi_client_infers_and_sees_errors_as_runtime_error(start_server, openpi_python):
    handle = start_server(models=(ModelConfig.parse("libero_tiny=gpu_worker.models.libero_tiny:LiberoTinyPolicy"),))
    result = subprocess.run(
        [openpi_python, str(HERE / "openpi_client_check.py"), "127.0.0.1", str(handle.port)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["metadata_model"] == "libero_tiny" and seen["metadata_models"] == ["libero_tiny"]
    assert seen["action_horizon"] == 10
    assert seen["actions_shape"] == [10, 7] and seen["actions_dtype"] == "<f4"
    assert seen["server_timing"] == ["batch_requests", "batch_size", "infer_ms", "queue_ms"]
    assert "prev_total_ms" in seen["second_timing"]
    assert seen["error"].startswith("Error in inference server:\nbad request: observation is missing key(s)")
    assert "'observation/wrist_image'" in seen["error"]
    assert seen["same_after_error"]

    # The client's answer equals a direct in-process call on the same observation.
    rng = np.random.default_rng(0)
    obs = {
        "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)[None],
        "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)[None],
        "observation/state": rng.normal(size=8).astype(np.float32)[None],
        "prompt": np.array(["put the bowl on the plate"]),
    }
    direct = load_model("gpu_worker.models.libero_tiny:LiberoTinyPolicy", None, device="cpu").infer_batch(obs)
    np.testing.assert_allclose(np.array(seen["actions"]), direct["actions"][0], rtol=1e-5, atol=1e-6)
