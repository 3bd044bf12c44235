"""Property-based fuzzing of /score bodies and of raw WebSocket frames to gpu_worker.

No 5xx, no crash, no hang; a valid request still succeeds afterwards.
"""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import affine
from gpu_worker.client import ModelClient
from gpu_worker.config import ModelConfig, ServerConfig
from gpu_worker.server import ServerThread
from pi0_reward_server.app import create_app

FIELD_NAMES = ["responses", "reward_function_kwargs", "task", "env", "episodes", "seed", "max_steps", "model",
               "success_threshold", "return_range", "prompt", "max_workers"]
TASK_NAMES = ["cartpole", "cartpole_short", "gym:CartPole-v1", "gym:Acrobot-v1", "gym:Pendulum-v1", "gym:os:system",
              "gym:", "chess", "", "gym:NoSuchEnv-v0"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.sampled_from(TASK_NAMES),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8)), children, max_size=5),
    ),
    max_leaves=20,
)
task_objects = st.fixed_dictionaries({}, optional={name: json_values for name in FIELD_NAMES[2:]})
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"responses": st.one_of(json_values, st.lists(st.one_of(st.sampled_from(TASK_NAMES), task_objects), max_size=4))},
        optional={"reward_function_kwargs": st.one_of(json_values, task_objects)},
    ),
)


@pytest.fixture(scope="module")
def app_and_server():
    server = ServerThread(ServerConfig(port=0, log_level="WARNING")).start()
    app = create_app({"model_servers": (server.url,), "max_responses": 4, "max_episodes_per_task": 2,
                      "max_steps_per_episode": 20, "default_episodes": 1, "max_workers_cap": 4,
                      "log_level": "ERROR", "request_timeout_s": 10})
    yield app
    app.extensions["client_pool"].close()
    server.stop()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(body=bodies)
def test_score_never_answers_5xx(app_and_server, body):
    client = app_and_server.test_client()
    try:
        data = json.dumps(body, allow_nan=True)
    except (ValueError, OverflowError):
        return
    response = client.post("/score", data=data, content_type="application/json")
    assert response.status_code in (200, 400, 429), (response.status_code, response.get_data(as_text=True)[:300])
    payload = response.get_json()
    assert isinstance(payload, dict)
    if response.status_code == 200:
        assert len(payload["scores"]) == len(body["responses"])
    else:
        assert payload["error"]


def test_score_still_works_after_fuzzing(app_and_server):
    response = app_and_server.test_client().post(
        "/score", json={"responses": [{"task": "cartpole", "max_steps": 20, "success_threshold": 20}],
                        "reward_function_kwargs": {"episodes": 1}})
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["scores"] == [1.0]


# -- raw frames to gpu_worker ------------------------------------------------------------------
wire_scalars = st.one_of(  # what msgpack can carry: integers within 64 bits
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.binary(max_size=32),
)
dtypes = st.sampled_from(["<f4", "<f8", "|u1", "<i8", "|b1", "<U4", "O", "|V4", "<c8", "x", "", "<f4,<f4", "S3"])
ndarray_maps = st.fixed_dictionaries({
    b"__ndarray__": st.one_of(st.just(True), wire_scalars),
    b"data": st.one_of(st.binary(max_size=64), wire_scalars),
    b"dtype": st.one_of(dtypes, wire_scalars),
    b"shape": st.one_of(st.lists(st.integers(min_value=-3, max_value=2**64 - 1), max_size=40), wire_scalars),
})
npgeneric_maps = st.fixed_dictionaries({b"__npgeneric__": st.just(True), b"data": wire_scalars, b"dtype": st.one_of(dtypes, wire_scalars)})
msgpack_values = st.recursive(
    st.one_of(wire_scalars, ndarray_maps, npgeneric_maps),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(["observation/state", "observation", "state", "prompt", "__model__"]),
                                  st.text(max_size=6)), children, max_size=4),
    ),
    max_leaves=16,
)
frames = st.one_of(
    st.binary(max_size=256),
    st.text(max_size=64),
    msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True)),
)


@pytest.fixture(scope="module")
def model_server():
    server = ServerThread(ServerConfig(port=0, log_level="ERROR", max_message_bytes=1 << 20, models=(
        ModelConfig.parse("cartpole=gpu_worker.models.cartpole:CartPolePolicy"), affine(),
        ModelConfig(name="p", target="gpu_worker.models.testing:PromptModel")))).start()
    yield server
    server.stop()


GOOD = {"observation/state": np.zeros(4, dtype=np.float32)}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(frame=frames)
def test_any_frame_gets_an_answer_and_the_connection_survives(model_server, frame):
    with ModelClient(model_server.url, timeout=10) as client:
        reply = client.send_raw(frame)
        assert isinstance(reply, (str, dict, list))
        if isinstance(reply, str):
            assert reply.startswith(("bad request:", "text frames are not accepted", "model '")), reply[:200]
        assert client.infer(GOOD)["actions"] in (0, 1)


def test_model_server_still_works_after_fuzzing(model_server):
    with ModelClient(model_server.url) as client:
        assert client.infer(GOOD)["actions"] in (0, 1)


# -- every numeric field: integers past float's range, non-ASCII digits ------------------------
NUMERIC_FIELDS = {
    "rollout": ("episodes", "seed", "max_steps", "success_threshold", "return_range"),
    "selfplay": ("rows", "cols", "games", "simulations", "seed", "leaves_per_round", "temperature_moves", "c_puct",
                 "max_positions"),
    "libero": ("task_id", "episodes", "seed", "init_state", "max_steps", "replan_steps"),
}
BASES = {"rollout": {"task": "cartpole"}, "selfplay": {"kind": "selfplay", "game": "connect4"},
         "libero": {"kind": "libero", "suite": "libero_spatial", "task_id": 0}}
huge_integers = st.integers(min_value=10**309, max_value=10**4000).flatmap(lambda n: st.sampled_from([n, -n]))
odd_digits = st.text(alphabet="²³¹٣٤٥۶७৮๙０１①⑵", min_size=1, max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind_field=st.sampled_from([(k, f) for k, fields in NUMERIC_FIELDS.items() for f in fields]),
       value=st.one_of(huge_integers, odd_digits, st.lists(huge_integers, min_size=2, max_size=2)),
       in_kwargs=st.booleans())
def test_huge_numbers_and_odd_digits_get_a_400_naming_the_field(app_and_server, kind_field, value, in_kwargs):
    kind, field = kind_field
    if in_kwargs and kind == "libero":
        return  # kwargs apply to every kind; the rollout and selfplay cases cover them
    spec = dict(BASES[kind])
    body = {"responses": [spec]}
    if in_kwargs:
        body["reward_function_kwargs"] = {field: value}
    else:
        spec[field] = value
    response = app_and_server.test_client().post("/score", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 400, (response.status_code, response.get_data(as_text=True)[:300])
    assert field in response.get_json()["error"] or field in response.get_json().get("field", "")


@pytest.mark.parametrize("reference", ["libero:libero_spatial:²", "libero:libero_spatial:٣", "libero:libero_spatial:1" + "0" * 400])
def test_a_libero_reference_with_odd_digits_gets_a_400(app_and_server, reference):
    response = app_and_server.test_client().post("/score", json={"responses": [reference]})
    assert response.status_code == 400, response.get_data(as_text=True)[:300]
    assert "must look like 'libero:<suite>:<task_id>'" in response.get_json()["error"]


@pytest.mark.parametrize("value", [10**400, -(10**400)])
def test_max_workers_past_float_range_gets_a_400(app_and_server, value):
    response = app_and_server.test_client().post(
        "/score", data=json.dumps({"responses": ["cartpole"], "reward_function_kwargs": {"max_workers": value}}),
        content_type="application/json")
    assert response.status_code == 400 and "max_workers" in response.get_json()["error"]
