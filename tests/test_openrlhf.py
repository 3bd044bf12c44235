"""OpenRLHF's remote reward protocol against the real app and model servers: the bodies OpenRLHF sends
(one sample, a whole batch, empty lists to an idle extra URL), labels naming tasks, responses as prompts,
and failures it can see."""

from __future__ import annotations

import json

import pytest

from conftest import affine
from gpu_worker.config import ModelConfig

CARTPOLE = ModelConfig.parse("cartpole=gpu_worker.models.cartpole:CartPolePolicy")
PROMPT = ModelConfig(name="prompt", target="gpu_worker.models.testing:PromptModel")
ROUTE = "/openrlhf/get_reward"


@pytest.fixture
def app_for(start_server, make_app):
    def make(*models, **overrides):
        server = start_server(models=models, log_level="WARNING")
        return make_app(model_servers=(server.url,), **overrides)

    return make


def test_per_sample_batched_and_empty_bodies(app_for):
    client = app_for(CARTPOLE).test_client()
    one = client.post(ROUTE, json={"query": ["q"], "prompts": ["q"], "labels": ["cartpole_short"]})
    assert one.status_code == 200, one.get_json()
    assert one.get_json()["rewards"] == one.get_json()["scores"] == [1.0]
    labels = ["cartpole_short", json.dumps({"task": "cartpole", "max_steps": 30, "success_threshold": 30}),
              json.dumps({"task": "gym:CartPole-v1", "return_range": [0, 1000], "max_steps": 20, "episodes": 2})]
    batch = client.post(ROUTE, json={"query": ["a", "b", "c"], "prompts": ["a", "b", "c"], "labels": labels}).get_json()
    assert batch["rewards"] == [1.0, 1.0, 0.02] and len(batch["extra_logs"]["cached"]) == 3
    assert batch["extra_logs"]["cached"][0] == 1  # the same sample as the first call: answered from the cache
    empty = client.post(ROUTE, json={"query": [], "prompts": [], "labels": []})
    assert empty.status_code == 200 and empty.get_json() == {"rewards": [], "scores": [], "extra_logs": {}}


def test_the_response_is_the_prompt_of_the_labelled_task(app_for):
    client = app_for(PROMPT).test_client()
    label = json.dumps({"task": "gym:MountainCar-v0", "return_range": [-200, 0], "max_steps": 3, "episodes": 1,
                        "model": "prompt", "response_as": "prompt"})
    body = {"query": ["Instruction: park.\nPush left then right", "Instruction: park.\nJust wait"],
            "prompts": ["Instruction: park.\n", "Instruction: park.\n"], "labels": [label, label]}
    response = client.post(ROUTE, json=body)
    assert response.status_code == 200, response.get_json()
    jobs = client.get("/jobs").get_json()["jobs"]
    details = client.get(f"/jobs/{jobs[0]['id']}").get_json()["result"]["details"]
    assert [d["task"]["prompt"] for d in details] == ["Push left then right", "Just wait"]


def test_the_app_setting_names_the_task_when_labels_do_not(app_for):
    client = app_for(CARTPOLE, openrlhf_task="cartpole_short").test_client()
    response = client.post(ROUTE, json={"query": ["x", "y"], "prompts": ["x", "y"]})
    assert response.status_code == 200 and response.get_json()["rewards"] == [1.0, 1.0]


@pytest.mark.parametrize("body, message", [
    ({"prompts": ["a"]}, "query: missing"),
    ({"query": "a"}, "query: must be a list"),
    ({"query": ["a", "b"], "labels": ["cartpole"]}, "labels: holds 1 items but query holds 2"),
    ({"query": ["a"]}, "labels[0]: names no task"),
    ({"query": ["a"], "labels": ["{not json"]}, "labels[0]: not a JSON object"),
    ({"query": ["a"], "labels": ["chess"]}, "unknown task 'chess'"),
    ({"query": [3], "labels": ["cartpole"]}, "query[0]: must be a string"),
])
def test_bad_bodies_get_a_400_that_names_the_problem(app_for, body, message):
    response = app_for(CARTPOLE).test_client().post(ROUTE, json=body)
    assert response.status_code == 400 and message in response.get_json()["error"], response.get_json()


def test_a_failed_task_is_a_503_the_trainer_sees_not_a_zero(app_for):
    client = app_for(affine(fail_on_negative=True)).test_client()
    # CartPole's first observation has negative values for most seeds: the model raises on it.
    response = client.post(ROUTE, json={"query": ["q"], "labels": [json.dumps({"task": "cartpole_short", "seed": 1})]})
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert "1 of 1 task(s) failed" in response.get_json()["error"]


def test_the_token_guards_the_route(app_for):
    client = app_for(CARTPOLE, token="a-long-enough-token").test_client()
    assert client.post(ROUTE, json={"query": []}).status_code == 401
    ok = client.post(ROUTE, json={"query": []}, headers={"Authorization": "Bearer a-long-enough-token"})
    assert ok.status_code == 200
