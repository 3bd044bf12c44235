"""Process-level behaviour: CLI validation, /healthz, metadata, SIGTERM drain, spawn safety, GPU pinning."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import ROOT, cuda_count, http_status
from gpu_worker import wire
from gpu_worker.client import ModelClient
from gpu_worker.config import ModelConfig, ServerConfig


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gpu_worker", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-batch-size", "0"], "max_batch_size must be an integer between 1 and 65536, got 0"),
        (["--max-wait-ms", "-1"], "max_wait_ms must be between 0 and 1000"),
        (["--batch-gap-ms", "-1"], "batch_gap_ms must be between 0 and 1000"),
        (["--port", "70000"], "port must be an integer between 0 and 65535"),
        (["--port", "http"], "argument --port: invalid int value: 'http'"),
        (["--device", "gpu0"], "device 'gpu0' must be auto, cpu, cuda or cuda:N"),
        (["--model", "cartpole"], "--model 'cartpole' must look like NAME=package.module:Class[@CHECKPOINT]"),
        (["--model", "a=not a target"], "target 'not a target' must look like 'package.module:ClassName'"),
        (["--model", "a=x.y:Z", "--model", "a=x.y:W"], "model names must be unique, got ['a']"),
        (["--log-level", "LOUD"], "argument --log-level: invalid choice: 'LOUD'"),
        (["--config", "/nonexistent/gpu_worker.toml"], "cannot read config file '/nonexistent/gpu_worker.toml'"),
    ],
)
def test_bad_flags_exit_2_with_a_message(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr


def test_bad_config_file_names_the_option(tmp_path):
    config = tmp_path / "server.toml"
    config.write_text('port = 8000\nmax_batch = 5\n')
    result = run_cli("--config", str(config))
    assert result.returncode == 2 and "unknown option(s) ['max_batch']" in result.stderr
    config.write_text("port = [")
    result = run_cli("--config", str(config))
    assert result.returncode == 2 and "is not valid TOML" in result.stderr


@pytest.mark.parametrize(
    "model, message",
    [
        ("a=no_such_package.mod:Policy", "cannot import module 'no_such_package.mod'"),
        ("a=gpu_worker.models.cartpole:NoSuchClass", "has no attribute 'NoSuchClass'"),
        ("a=gpu_worker.models.cartpole:CartPolePolicy@/nonexistent.pt", "checkpoint '/nonexistent.pt'"),
        ("a=gpu_worker.config:ConfigError", "has no from_checkpoint"),
    ],
)
def test_unloadable_model_exits_1_with_the_reason(model, message):
    result = run_cli("--port", "0", "--model", model)
    assert result.returncode == 1
    assert message in result.stderr


def test_healthz_is_503_while_loading_then_200_and_metadata_describes_everything(cli_server, tmp_path):
    config = tmp_path / "server.toml"
    config.write_text(
        "max_batch_size = 32\n"
        "[[models]]\nname = \"slow\"\ntarget = \"gpu_worker.models.testing:AffineModel\"\n"
        "options = { load_delay_s = 1.5 }\n"
        "[[models]]\nname = \"libero\"\ntarget = \"gpu_worker.models.libero_tiny:LiberoTinyPolicy\"\n"
    )
    server = cli_server("--config", str(config))
    assert http_status(f"http://127.0.0.1:{server.port}/healthz") == 503
    assert http_status(f"http://127.0.0.1:{server.port}/") == 503  # no WebSocket while loading
    server.wait_healthy()
    with ModelClient(server.url) as client:
        meta = client.metadata
        assert meta["kind"] == "AffineModel"  # the default model's own metadata, at the top level
        assert meta["default_model"] == "slow" and meta["model"] == "slow"
        assert meta["server"]["max_batch_size"] == 32 and meta["server"]["device"] == "cpu"
        assert meta["server"]["name"] == "gpu_worker" and meta["server"]["explicit_batch"] is True
        assert set(meta["models"]) == {"slow", "libero"}
        libero = meta["models"]["libero"]
        assert libero["inputs"] == {
            "observation/image": {"shape": [224, 224, 3], "dtype": "|u1"},
            "observation/wrist_image": {"shape": [224, 224, 3], "dtype": "|u1"},
            "observation/state": {"shape": [8], "dtype": "<f4"},
            "prompt": {"shape": [], "dtype": "str"},
        }
        assert libero["outputs"] == {"actions": {"shape": [10, 7], "dtype": "<f4"}}
        # A client can build a valid request from the metadata alone.
        obs = {
            key: "pick up the bowl" if spec["dtype"] == "str" else np.zeros(spec["shape"], np.dtype(spec["dtype"]))
            for key, spec in libero["inputs"].items()
        }
        reply = client.infer({**obs, "__model__": "libero"})
        assert reply["actions"].shape == (10, 7) and reply["actions"].dtype == np.float32
        float_images = {**obs, "__model__": "libero", "observation/image": np.zeros((224, 224, 3), np.float32)}
        assert "has dtype float32; expected uint8" in client.send_raw(wire.packb(float_images))
    with ModelClient(server.url + "/models/libero") as client:
        assert client.metadata["model"] == "libero" and client.metadata["action_horizon"] == 10


def test_sigterm_drains_in_flight_requests_and_exits_0(cli_server, tmp_path):
    gate, entered = tmp_path / "gate", tmp_path / "entered"
    config = tmp_path / "server.json"
    config.write_text(json.dumps({
        "shutdown_grace_s": 30,
        "models": [{"name": "a", "target": "gpu_worker.models.testing:AffineModel",
                    "options": {"gate_file": str(gate), "entered_file": str(entered)}}],
    }))
    server = cli_server("--config", str(config))
    server.wait_healthy()
    client = ModelClient(server.url)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(client.infer({"observation/state": np.array([1.0, 2.0])})))
    thread.start()
    deadline = time.monotonic() + 30
    while not entered.exists():  # the request is inside the model
        assert time.monotonic() < deadline
        time.sleep(0.01)
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while http_status(f"http://127.0.0.1:{server.port}/healthz") not in (503, None):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    gate.touch()
    thread.join(30)
    np.testing.assert_allclose(result["actions"], [3.0, 5.0])  # the in-flight request was answered
    assert server.proc.wait(30) == 0
    assert "signal received: shutting down" in server.log()


def test_server_spawned_from_a_parent_that_already_ran_torch_comes_up(tmp_path):
    import torch

    torch.set_num_threads(2)
    layer = torch.nn.Linear(256, 256)
    with torch.no_grad():
        layer(torch.randn(64, 256))  # the parent's intra-op thread pool is now live
    from gpu_worker.launch import start_server_process

    config = ServerConfig(port=0, models=(ModelConfig.parse("cartpole=gpu_worker.models.cartpole:CartPolePolicy"),))
    process = start_server_process(config, timeout=120)
    try:
        assert http_status(f"http://127.0.0.1:{process.port}/healthz") == 200
        with ModelClient(process.url) as client:
            assert client.infer({"observation/state": np.zeros(4, np.float32)})["actions"] in (0, 1)
    finally:
        assert process.stop() == 0


def test_spawned_server_reports_a_load_failure(tmp_path):
    from gpu_worker.launch import start_server_process

    config = ServerConfig(port=0, models=(ModelConfig.parse("a=no_such_package.mod:Policy"),))
    with pytest.raises(RuntimeError, match="cannot import module 'no_such_package.mod'"):
        start_server_process(config, timeout=60)


@pytest.mark.cuda
@pytest.mark.skipif(cuda_count() == 0, reason="needs a CUDA GPU")
def test_cuda_server_is_pinned_to_the_visible_gpu(cli_server):
    gpu = str(cuda_count() - 1)
    server = cli_server("--model", "m=gpu_worker.models.compute_mlp:ComputeMLP", env={"CUDA_VISIBLE_DEVICES": gpu})
    server.wait_healthy()
    with ModelClient(server.url) as client:
        assert client.metadata["server"]["device"] == "cuda"
        client.infer({"observation/state": np.zeros(64, np.float32)})
    # nvidia-smi lists the server's process on that GPU only.
    query = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,gpu_uuid", "--format=csv,noheader"], capture_output=True, text=True
    )
    uuids = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"], capture_output=True, text=True
    ).stdout
    index_of = {line.split(", ")[1].strip(): line.split(", ")[0] for line in uuids.strip().splitlines()}
    used = {index_of[line.split(", ")[1].strip()] for line in query.stdout.strip().splitlines()
            if line.split(", ")[0] == str(server.proc.pid)}
    assert used == {gpu}


def test_sigterm_while_loading_exits_promptly(cli_server, tmp_path):
    config = tmp_path / "slow.toml"
    config.write_text('[[models]]\nname = "slow"\ntarget = "gpu_worker.models.testing:AffineModel"\n'
                      "options = { load_delay_s = 60 }\n")
    server = cli_server("--config", str(config))
    assert http_status(f"http://127.0.0.1:{server.port}/healthz") == 503
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    assert time.monotonic() - started < 20
    assert "signal received while loading models" in server.log()
