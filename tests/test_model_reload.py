"""Hot reload on a real model server: a new checkpoint swapped in under continuous load from several clients,
bad checkpoints refused while the old weights keep serving, and the admin path guarded."""

from __future__ import annotations

import pathlib
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from websockets.exceptions import InvalidStatus

from gpu_worker.client import ModelClient, admin_call
from gpu_worker.config import ModelConfig
from gpu_worker.model import load_model

CARTPOLE = "gpu_worker.models.cartpole:CartPolePolicy"
SHIPPED = pathlib.Path(__file__).resolve().parents[1] / "gpu_worker" / "checkpoints" / "cartpole_mlp.pt"


def perturbed(tmp_path: pathlib.Path, name: str = "cartpole_v2.pt", *, scale: float = 0.5,
              value: float | None = None) -> str:
    """The shipped CartPole weights changed: a checkpoint a trainer could have written."""
    state = torch.load(SHIPPED, weights_only=True)
    generator = torch.Generator().manual_seed(1)
    for key, tensor in state.items():
        state[key] = torch.full_like(tensor, value) if value is not None else \
            tensor + scale * torch.randn(tensor.shape, generator=generator)
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


def observations(n: int, seed: int = 0) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32))


@pytest.fixture
def cartpole_server(start_server):
    return start_server(models=(ModelConfig("cartpole", CARTPOLE),), log_level="WARNING")


def test_reload_under_load_switches_each_connection_once_and_serves_the_new_weights(cartpole_server, tmp_path):
    new_checkpoint = perturbed(tmp_path)
    old = load_model(CARTPOLE, str(SHIPPED), device="cpu")
    new = load_model(CARTPOLE, new_checkpoint, device="cpu")
    assert old.version != new.version
    obs = observations(64)
    batch = {"observation/state": np.stack(obs)}
    assert not np.allclose(old.infer_batch(batch)["logits"], new.infer_batch(batch)["logits"], atol=0.05)
    stop = threading.Event()
    seen: list[list[tuple[str, int, np.ndarray]]] = [[] for _ in range(4)]
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            with ModelClient(cartpole_server.url) as conn:
                i = 0
                while not stop.is_set():
                    x = obs[(k * 16 + i) % len(obs)]
                    reply = conn.infer({"observation/state": x})
                    seen[k].append((reply["model"]["version"], (k * 16 + i) % len(obs), reply["logits"]))
                    i += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    answer = admin_call(cartpole_server.url, {"command": "reload", "model": "cartpole", "checkpoint": new_checkpoint})
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors, errors
    assert answer["ok"] and answer["version"] == new.version and answer["previous_version"] == old.version
    assert answer["load_s"] >= 0 and answer["warmup_s"] >= 0
    for replies in seen:
        versions = [v for v, _, _ in replies]
        switch = versions.index(new.version)  # every connection saw the switch ...
        assert versions[:switch] == [old.version] * switch and switch > 0  # ... exactly once, old then new
        assert versions[switch:] == [new.version] * (len(versions) - switch)
        for version, i, logits in replies:
            model = new if version == new.version else old
            expected = model.infer_batch({"observation/state": obs[i][None]})["logits"][0]
            np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)  # batched vs one row
    with ModelClient(cartpole_server.url) as conn:  # a new connection is told the new version
        assert conn.metadata["models"]["cartpole"]["version"] == new.version
        assert conn.metadata["models"]["cartpole"]["checkpoint"] == new_checkpoint


@pytest.mark.parametrize("make, reason", [
    (lambda tmp: (tmp / "corrupt.pt").write_bytes(b"not a checkpoint") and str(tmp / "corrupt.pt"),
     "could not be loaded"),
    (lambda tmp: str(tmp / "missing.pt"), "does not exist"),
    (lambda tmp: perturbed(tmp, "nan.pt", value=float("nan")), "warm-up output 'logits' is not finite"),
    (lambda tmp: torch.save({"net.0.weight": torch.zeros(3, 3)}, tmp / "other.pt") or str(tmp / "other.pt"),
     "could not be loaded"),
])
def test_a_bad_checkpoint_is_refused_and_the_old_one_keeps_serving(cartpole_server, tmp_path, make, reason):
    with ModelClient(cartpole_server.url) as conn:
        before = conn.infer({"observation/state": np.zeros(4, np.float32)})
        answer = admin_call(cartpole_server.url, {"command": "reload", "model": "cartpole",
                                                  "checkpoint": make(tmp_path)})
        assert answer["ok"] is False and reason in answer["error"], answer
        after = conn.infer({"observation/state": np.zeros(4, np.float32)})
    assert after["model"] == before["model"]
    np.testing.assert_array_equal(after["logits"], before["logits"])


def test_bad_admin_calls_are_answered_and_the_connection_stays(cartpole_server, tmp_path):
    with ModelClient(cartpole_server.url.rstrip("/") + "/admin") as conn:
        assert conn.metadata["admin"] is True and conn.metadata["models"]["cartpole"]["version"]
        assert "unknown admin command" in conn._roundtrip({"command": "explode"})["error"]
        assert "unknown model 'pole'" in conn._roundtrip({"command": "reload", "model": "pole",
                                                          "checkpoint": str(SHIPPED)})["error"]
        assert "one msgpack map" in conn._roundtrip([1, 2])["error"]
        assert "checkpoint: must be a path" in conn._roundtrip({"command": "reload", "model": "cartpole"})["error"]
        assert conn._roundtrip({"command": "status"})["ok"] is True


def test_not_enough_memory_for_two_copies_is_refused_before_loading(cartpole_server, tmp_path):
    cartpole_server.server.free_bytes = lambda device: 1024  # a device nearly full
    answer = admin_call(cartpole_server.url, {"command": "reload", "model": "cartpole",
                                              "checkpoint": perturbed(tmp_path)})
    assert answer["ok"] is False and "not enough memory on cpu" in answer["error"] and "1 MiB" not in answer["error"]


def slow_models(load_delay_s: float) -> tuple:
    return (ModelConfig("affine", "gpu_worker.models.testing:AffineModel", options={"load_delay_s": load_delay_s}),
            ModelConfig("other", "gpu_worker.models.testing:AffineModel"))


def test_one_reload_at_a_time_per_server(start_server, tmp_path):
    server = start_server(models=slow_models(1.0), log_level="WARNING")
    checkpoint = tmp_path / "any.bin"
    checkpoint.write_bytes(b"x")
    first: dict = {}
    thread = threading.Thread(target=lambda: first.update(admin_call(
        server.url, {"command": "reload", "model": "affine", "checkpoint": str(checkpoint)})))
    thread.start()
    time.sleep(0.3)
    for model in ("affine", "other"):  # two copies of two models could each pass the memory check
        second = admin_call(server.url, {"command": "reload", "model": model, "checkpoint": str(checkpoint)})
        assert second["ok"] is False and "a reload of model 'affine' is running" in second["error"]
    thread.join(10)
    assert first["ok"] is True


def test_a_caller_that_leaves_before_the_swap_gets_no_swap(start_server, tmp_path):
    server = start_server(models=slow_models(1.0), log_level="WARNING")
    checkpoint = tmp_path / "new.bin"
    checkpoint.write_bytes(b"x")
    with pytest.raises(TimeoutError):
        admin_call(server.url, {"command": "reload", "model": "affine", "checkpoint": str(checkpoint)}, timeout=0.3)
    time.sleep(1.5)  # the load ends after the caller left
    status = admin_call(server.url, {"command": "status"})
    assert status["models"]["affine"]["checkpoint"] is None  # still the copy loaded at start
    again = admin_call(server.url, {"command": "reload", "model": "affine", "checkpoint": str(checkpoint)})
    assert again["ok"] and admin_call(server.url, {"command": "status"})["models"]["affine"]["checkpoint"] == \
        str(checkpoint)


def test_the_old_copy_is_released_after_its_last_batch(cartpole_server, tmp_path):
    import gc
    import weakref

    old = weakref.ref(next(iter(cartpole_server.server.models.values())).policy)
    with ModelClient(cartpole_server.url) as conn:
        conn.infer({"observation/state": np.zeros(4, np.float32)})
        assert admin_call(cartpole_server.url, {"command": "reload", "model": "cartpole",
                                                "checkpoint": perturbed(tmp_path)})["ok"]
        gc.collect()
        assert old() is None  # no batcher local, no metadata, nothing keeps the replaced weights
        assert conn.infer({"observation/state": np.zeros(4, np.float32)})["model"]["version"].startswith("cartpole_v2")


def test_admin_needs_the_api_key_and_loopback_without_one(start_server, tmp_path):
    keyed = start_server(models=(ModelConfig("cartpole", CARTPOLE),), api_key="k" * 16, log_level="WARNING")
    with pytest.raises(InvalidStatus) as refused:
        admin_call(keyed.url, {"command": "status"})
    assert refused.value.response.status_code == 401
    assert admin_call(keyed.url, {"command": "status"}, api_key="k" * 16)["ok"] is True
    with pytest.raises(urllib.error.HTTPError) as status_refused:  # /status shows versions and paths: keyed too
        urllib.request.urlopen(f"http://127.0.0.1:{keyed.port}/status", timeout=5)
    assert status_refused.value.code == 401
    open_server = start_server(models=(ModelConfig("cartpole", CARTPOLE),), host="0.0.0.0", log_level="WARNING")
    with pytest.raises(InvalidStatus) as forbidden:
        admin_call(f"ws://127.0.0.1:{open_server.port}", {"command": "status"})
    assert forbidden.value.response.status_code == 403
    assert b"api_key" in forbidden.value.response.body


# -- across the pool: POST /admin/models/<name>/reload on the reward app ----------------------------------


def cartpole_servers(start_server, n: int):
    return [start_server(models=(ModelConfig("cartpole", CARTPOLE),), log_level="WARNING") for _ in range(n)]


TOKEN = "admin-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_reload_across_the_pool_then_results_name_the_new_version_and_miss_the_old_cache(start_server, make_app,
                                                                                        tmp_path):
    servers = cartpole_servers(start_server, 2)
    client = make_app(model_servers=tuple(s.url for s in servers), token=TOKEN).test_client()
    client.environ_base.update({"HTTP_AUTHORIZATION": AUTH["Authorization"]})
    task = {"responses": [{"task": "cartpole_short", "episodes": 1}], "reward_function_kwargs": {"max_workers": 1}}
    first = client.post("/score", json=task).get_json()["details"][0]
    old_version = first["model_versions"][0]
    assert old_version.startswith("cartpole@cartpole_mlp.pt@") and first["cached"] is False
    assert client.post("/score", json=task).get_json()["details"][0]["cached"] is True
    checkpoint = perturbed(tmp_path, scale=0.01)  # still balances: a fine-tuned policy
    response = client.post("/admin/models/cartpole/reload", json={"checkpoint": checkpoint})
    body = response.get_json()
    assert response.status_code == 200 and body["consistent"] is True, body
    new_version = f"cartpole@{body['servers'][0]['version']}"
    assert [o["ok"] for o in body["servers"]] == [True, True] and len(set(body["versions"].values())) == 1
    assert "all 2 model server(s) serve cartpole@cartpole_v2.pt@" in body["message"]
    assert all(s["versions"]["cartpole"] == body["servers"][0]["version"]
               for s in client.get("/pool_status").get_json()["servers"])
    after = client.post("/score", json=task).get_json()["details"][0]
    assert after["cached"] is False and after["model_versions"] == [new_version]  # not the old weights' result
    assert client.post("/score", json=task).get_json()["details"][0]["cached"] is True  # cached on the new one


def test_a_reload_made_elsewhere_is_seen_by_the_very_next_job(start_server, make_app, tmp_path):
    """Another app process (another gunicorn worker) or an operator reloads: this app's next job must not
    answer from the old weights' cache, even a moment later."""
    server = cartpole_servers(start_server, 1)[0]
    client = make_app(model_servers=(server.url,)).test_client()
    task = {"responses": [{"task": "cartpole_short", "episodes": 1}]}
    assert client.post("/score", json=task).get_json()["details"][0]["cached"] is False
    assert client.post("/score", json=task).get_json()["details"][0]["cached"] is True
    answer = admin_call(server.url, {"command": "reload", "model": "cartpole",
                                     "checkpoint": perturbed(tmp_path, scale=0.01)})
    after = client.post("/score", json=task).get_json()["details"][0]  # at once, not a second later
    assert after["cached"] is False and after["model_versions"] == [f"cartpole@{answer['version']}"]


def test_reload_fan_out_reports_a_server_that_is_down_and_says_they_disagree(start_server, make_app, tmp_path):
    servers = cartpole_servers(start_server, 2)
    app = make_app(model_servers=tuple(s.url for s in servers), health_interval_s=0.2, probe_interval_s=0.2,
                   token=TOKEN)
    client = app.test_client()
    client.environ_base.update({"HTTP_AUTHORIZATION": AUTH["Authorization"]})
    assert client.post("/score", json={"responses": ["cartpole_short"]}).status_code == 200
    servers[1].stop(grace_s=1)
    response = client.post("/admin/models/cartpole/reload", json={"checkpoint": perturbed(tmp_path), "timeout_s": 30})
    body = response.get_json()
    assert response.status_code == 502 and body["consistent"] is False
    up, down = body["servers"]
    assert up["ok"] is True and up["version"].startswith("cartpole_v2.pt@")
    assert down["ok"] is False and down["url"] == servers[1].url and down["error"]
    assert "1 of 2 model server(s) did not reload" in body["message"] and "now disagree" in body["message"]


def test_reload_reports_an_openpi_server_that_cannot_reload(start_server, openpi_servers, make_app, tmp_path):
    gpu = cartpole_servers(start_server, 1)[0]
    openpi = openpi_servers(model=CARTPOLE)
    client = make_app(model_servers=(gpu.url, openpi.url), token=TOKEN).test_client()
    client.environ_base.update({"HTTP_AUTHORIZATION": AUTH["Authorization"]})
    for _ in range(4):  # connections to both: the pool learns what each server is
        assert client.post("/score", json={"responses": ["cartpole_short"] * 2}).status_code == 200
    body = client.post("/admin/models/cartpole/reload", json={"checkpoint": perturbed(tmp_path)}).get_json()
    by_url = {o["url"]: o for o in body["servers"]}
    assert by_url[gpu.url]["ok"] is True
    assert by_url[openpi.url]["ok"] is False and "cannot reload" in by_url[openpi.url]["error"]


def test_reload_route_is_guarded_and_checks_its_body(start_server, make_app):
    servers = cartpole_servers(start_server, 1)
    guarded = make_app(model_servers=(servers[0].url,), token=TOKEN).test_client()
    assert guarded.post("/admin/models/cartpole/reload", json={"checkpoint": str(SHIPPED)}).status_code == 401
    open_app = make_app(model_servers=(servers[0].url,)).test_client()
    for remote_addr in ("127.0.0.1", "10.1.2.3"):  # no token: refused, loopback too (a local proxy is everyone)
        refused = open_app.post("/admin/models/cartpole/reload", json={"checkpoint": str(SHIPPED)},
                                environ_base={"REMOTE_ADDR": remote_addr})
        assert refused.status_code == 403 and "token" in refused.get_json()["error"]
    for body, field in (({}, "checkpoint"), ({"checkpoint": 3}, "checkpoint"), ([1], "body"),
                        ({"checkpoint": "x", "timeout_s": 0}, "timeout_s"), ({"checkpoint": "x", "y": 1}, "body")):
        response = guarded.post("/admin/models/cartpole/reload", json=body, headers=AUTH)
        assert response.status_code == 400 and response.get_json()["field"] == field, (body, response.get_json())
    bad = guarded.post("/admin/models/cartpole/reload", json={"checkpoint": "/no/such.pt"}, headers=AUTH).get_json()
    assert bad["consistent"] is False and "does not exist" in bad["servers"][0]["error"]
