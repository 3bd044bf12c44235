"""The trainer adapters called the way their trainers call them, against a real reward app (served over HTTP)
and real model servers: verl's file loaded by path as verl's loader does and awaited from its reward loop,
OpenRLHF's ``reward_func`` file imported and called from threads as OpenRLHF does, TRL's signature with
dataset columns; and the failures each must show its trainer."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import inspect
import json
import math
import os
import pathlib
import pickle
import socket
import threading
import time
from functools import partial

import numpy as np
import pytest

from conftest import ROOT, affine
from gpu_worker.config import ModelConfig
from gpu_worker.models.testing import AffineModel

CARTPOLE = ModelConfig.parse("cartpole=gpu_worker.models.cartpole:CartPolePolicy")
PROMPT = ModelConfig(name="prompt", target="gpu_worker.models.testing:PromptModel")
ADAPTERS = ROOT / "pi0_reward_server" / "integrations"


def steps_task(k: int) -> dict:
    """A CartPole task whose score is k / 1000: the shipped policy holds the pole for all k steps."""
    return {"task": "gym:CartPole-v1", "return_range": [0, 1000], "max_steps": k, "episodes": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- how the trainers load and call reward functions (their code, restated) ----------------------------------


def load_like_verl(path: pathlib.Path, name: str, reward_kwargs: dict):
    """verl.utils.import_utils.load_module + verl.trainer.ppo.reward.get_custom_reward_fn: a module named
    ``custom_module_<hash>`` that is not put in sys.modules, the function bound to reward_kwargs (which win
    over call-time kwargs), async functions kept async."""
    spec = importlib.util.spec_from_file_location(f"custom_module_{hash(os.path.abspath(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    raw_fn = getattr(module, name)

    def call(*args, **kwargs):
        return raw_fn(*args, **{**kwargs, **reward_kwargs})

    async def call_async(*args, **kwargs):
        return await raw_fn(*args, **{**kwargs, **reward_kwargs})

    return partial(call_async if inspect.iscoroutinefunction(raw_fn) else call)


async def verl_reward_loop(compute_score, samples: list[dict]) -> tuple[list, dict]:
    """verl's RewardLoopWorker.compute_score_batch over NaiveRewardManager.run_single: one task per sample,
    gathered; async functions awaited; the extra-info keys of the first sample collected for all."""
    is_async = inspect.iscoroutinefunction(compute_score)
    loop = asyncio.get_running_loop()

    async def run_single(sample: dict) -> dict:
        extra_info = dict(sample.get("extra_info") or {})
        extra_info["num_turns"], extra_info["rollout_reward_scores"] = None, {}
        call = partial(compute_score, data_source=sample["data_source"], solution_str=sample["response"],
                       ground_truth=sample["reward_model"]["ground_truth"], extra_info=extra_info)
        result = await call() if is_async else await loop.run_in_executor(None, call)
        if isinstance(result, dict):
            return {"reward_score": result["score"], "reward_extra_info": dict(result)}
        return {"reward_score": result, "reward_extra_info": {"acc": result}}

    outputs = await asyncio.gather(*(asyncio.create_task(run_single(s)) for s in samples))
    keys = list(outputs[0]["reward_extra_info"])
    extra = {k: np.array([o["reward_extra_info"][k] for o in outputs]) for k in keys}
    return [o["reward_score"] for o in outputs], extra


def load_like_openrlhf(path: pathlib.Path):
    """openrlhf.utils.agent.SingleTurnAgentExecutor: a URL ending in .py is imported as module 'reward_func'."""
    spec = importlib.util.spec_from_file_location("reward_func", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reward_func


async def openrlhf_per_sample(reward_func, queries, prompts, labels) -> list:
    """OpenRLHF's executors, one per sample at once, each calling reward_func([q], [p], [l]) in a thread."""
    return await asyncio.gather(*(asyncio.to_thread(reward_func, [q], [p], [l])
                                  for q, p, l in zip(queries, prompts, labels)))


# -- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture
def served(start_server, serve_app):
    def make(*models, **overrides):
        server = start_server(models=models or (CARTPOLE,), log_level="WARNING")
        return serve_app(model_servers=(server.url,), **overrides)

    return make


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch):
    for name in list(os.environ):
        if name.startswith("PI0_REWARD_"):
            monkeypatch.delenv(name)


# -- verl ----------------------------------------------------------------------------------------------------


def test_verl_64_concurrent_calls_become_one_batched_job(served):
    app = served()
    compute_score = load_like_verl(ADAPTERS / "verl.py", "compute_score", {"url": app.url})
    samples = [{"data_source": "pi0", "response": f"response {i}", "reward_model": {"ground_truth": json.dumps(steps_task(i + 1))}}
               for i in range(64)]
    scores, extra = asyncio.run(verl_reward_loop(compute_score, samples))
    assert scores == [pytest.approx((i + 1) / 1000) for i in range(64)]  # each caller got its own sample's score
    assert sorted(extra) == ["cached", "episodes", "failed", "score", "seconds"]
    assert extra["failed"].sum() == 0 and extra["episodes"].sum() == 64
    assert app.counts["POST /jobs"] == 1, app.counts  # 64 calls, one job
    assert app.counts["POST /score"] == 0
    assert app.counts["GET /jobs/<id>"] >= 1  # waited by polling, no request held open


def test_verl_file_loads_from_a_checkout_by_path_and_by_pkg_name(served):
    app = served()
    module = importlib.import_module("pi0_reward_server.integrations.verl")  # verl's pkg:// form
    by_pkg = asyncio.run(module.compute_score("src", "text", "cartpole_short", None, url=app.url))
    by_path = asyncio.run(load_like_verl(ADAPTERS / "verl.py", "compute_score", {"url": app.url})(
        data_source="src", solution_str="text", ground_truth="cartpole_short", extra_info={}))
    assert by_pkg["score"] == by_path["score"] == 1.0 and by_path["cached"] == 1.0  # the same task: cached


def test_verl_batch_manager_form_and_the_default_task(served):
    app = served()
    compute_score_batch = load_like_verl(ADAPTERS / "verl.py", "compute_score_batch",
                                         {"url": app.url, "task": json.dumps(steps_task(7))})
    results = compute_score_batch(data_sources=np.array(["a", "b", "c"], dtype=object),
                                  solution_strs=["x", "y", "z"], ground_truths=[None, "", steps_task(9)],
                                  extra_infos=[{}, {}, {}])
    assert [r["score"] for r in results] == [0.007, 0.007, 0.009]
    assert app.counts["POST /jobs"] == 1


def test_verl_response_as_prompt_sends_the_solution_as_the_policy_prompt(served):
    app = served(PROMPT)
    truth = {"task": "gym:MountainCar-v0", "return_range": [-200, 0], "max_steps": 3, "episodes": 1,
             "model": "prompt", "response_as": "prompt"}
    compute_score = load_like_verl(ADAPTERS / "verl.py", "compute_score", {"url": app.url})
    samples = [{"data_source": "d", "response": text, "reward_model": {"ground_truth": truth}}
               for text in ("  push left, then right ", "wait")]
    scores, _ = asyncio.run(verl_reward_loop(compute_score, samples))
    assert len(scores) == 2 and all(0 <= s <= 1 for s in scores)
    client = app.app.test_client()
    job = client.get("/jobs").get_json()["jobs"][0]
    details = client.get(f"/jobs/{job['id']}").get_json()["result"]["details"]
    assert [d["task"]["prompt"] for d in details] == ["push left, then right", "wait"]


def test_verl_failures_raise_or_are_nan_never_zero(served):
    app = served(affine(fail_on_negative=True))
    # CartPole's first observation has negative values for most seeds: the model raises on it.
    failing = json.dumps({"task": "cartpole_short", "seed": 1})
    compute_score = load_like_verl(ADAPTERS / "verl.py", "compute_score", {"url": app.url, "task_retries": 1})
    with pytest.raises(Exception) as raised:
        asyncio.run(compute_score(data_source="d", solution_str="s", ground_truth=failing, extra_info={}))
    assert type(raised.value).__name__ == "RewardServiceError" and "task failed on the service" in str(raised.value)
    assert app.counts["POST /jobs"] == 2  # resubmitted once, then reported
    as_nan = load_like_verl(ADAPTERS / "verl.py", "compute_score",
                            {"url": app.url, "task_retries": 0, "on_failure": "nan"})
    result = asyncio.run(as_nan(data_source="d", solution_str="s", ground_truth=failing, extra_info={}))
    assert math.isnan(result["score"]) and result["failed"] == 1.0


def test_verl_a_refused_sample_fails_alone_and_the_rest_are_scored(served):
    app = served()
    compute_score = load_like_verl(ADAPTERS / "verl.py", "compute_score", {"url": app.url, "on_failure": "nan"})
    truths = ["cartpole_short", "chess", json.dumps(steps_task(5)), "{not json", None]
    samples = [{"data_source": "d", "response": "r", "reward_model": {"ground_truth": t}} for t in truths]
    scores, extra = asyncio.run(verl_reward_loop(compute_score, samples))
    assert scores[0] == 1.0 and scores[2] == 0.005
    assert all(math.isnan(s) for s in (scores[1], scores[3], scores[4]))
    assert list(extra["failed"]) == [0, 1, 0, 1, 1]
    assert app.counts["POST /jobs"] == 2  # the batch, refused for 'chess'; then the rest


@pytest.mark.parametrize("kwargs, message", [
    ({"timeout_s": "soon"}, "timeout_s: must be a number"),
    ({"max_batch": 0}, "max_batch: must be an integer from 1"),
    ({"url": "ws://host:6006"}, "url: must be the reward app's http(s)"),
    ({"on_failure": "zero"}, "on_failure: must be one of ['raise', 'nan']"),
    ({"timeout": 5}, "unknown reward setting(s) ['timeout']"),
    ({"reward_function_kwargs": "{bad"}, "reward_function_kwargs: not JSON"),
])
def test_verl_bad_settings_name_the_setting(kwargs, message):
    from pi0_reward_server.integrations.verl import compute_score

    with pytest.raises(ValueError) as raised:
        asyncio.run(compute_score("d", "s", "cartpole", None, **kwargs))
    assert message in str(raised.value)


def test_a_bad_environment_variable_is_named(monkeypatch):
    from pi0_reward_server.integrations.verl import compute_score

    monkeypatch.setenv("PI0_REWARD_TIMEOUT_S", "-3")
    with pytest.raises(ValueError, match=r"timeout_s: .* \(from PI0_REWARD_TIMEOUT_S\)"):
        asyncio.run(compute_score("d", "s", "cartpole", None))


# -- OpenRLHF's reward_func file -----------------------------------------------------------------------------


def test_openrlhf_reward_func_per_sample_calls_from_threads_are_batched(served, monkeypatch):
    app = served()
    monkeypatch.setenv("PI0_REWARD_URL", app.url)
    reward_func = load_like_openrlhf(ADAPTERS / "openrlhf_func.py")
    labels = [json.dumps(steps_task(10 + i)) for i in range(16)]
    queries = [f"prompt {i} response {i}" for i in range(16)]
    prompts = [f"prompt {i} " for i in range(16)]
    answers = asyncio.run(openrlhf_per_sample(reward_func, queries, prompts, labels))
    assert [a["rewards"] for a in answers] == [[(10 + i) / 1000] for i in range(16)]
    assert all(a["scores"] == a["rewards"] and a["extra_logs"]["episodes"] == [1.0] for a in answers)
    # Each call holds one of the event loop's default threads (min(32, cpus + 4)) until its job ends, so the
    # calls come in waves of that many: a job per wave, not one per sample.
    waves = math.ceil(16 / min(32, (os.cpu_count() or 1) + 4))
    assert app.counts["POST /jobs"] <= waves + 1, app.counts
    whole = reward_func(queries[:3], prompts[:3], labels[:3])  # older OpenRLHF: the batch in one call
    assert whole["rewards"] == [0.01, 0.011, 0.012] and whole["extra_logs"]["cached"] == [1.0, 1.0, 1.0]


def test_openrlhf_reward_func_waits_past_180_s_style_limits_and_raises_on_failure(served, monkeypatch):
    app = served(affine(gated=True))
    monkeypatch.setenv("PI0_REWARD_URL", app.url)
    monkeypatch.setenv("PI0_REWARD_TASK", json.dumps({"task": "cartpole_short", "episodes": 1}))
    reward_func = load_like_openrlhf(ADAPTERS / "openrlhf_func.py")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(reward_func, ["q"], ["q"], [None])
        assert AffineModel.entered.wait(10)
        time.sleep(1.0)  # the evaluation runs on while the call polls; nothing is held open
        assert not pending.done()
        AffineModel.gate.set()
        assert pending.result(30)["rewards"] == [pytest.approx(pending.result()["scores"][0])]
    assert app.counts["GET /jobs/<id>"] >= 3
    monkeypatch.setenv("PI0_REWARD_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("PI0_REWARD_RETRIES", "1")
    with pytest.raises(Exception, match="ConnectionRefusedError.*after 2 attempts") as raised:
        reward_func(["q"], ["q"], ["cartpole"])
    assert type(raised.value).__name__ == "RewardServiceError"


# -- TRL -----------------------------------------------------------------------------------------------------


def test_trl_signature_with_dataset_columns_and_conversational_completions(served):
    from pi0_reward_server.integrations.trl import make_reward_func

    app = served(PROMPT)
    reward = make_reward_func(url=app.url)
    task = json.dumps({"task": "gym:MountainCar-v0", "return_range": [-200, 0], "max_steps": 3, "episodes": 1,
                       "model": "prompt", "response_as": "prompt"})
    logged: dict = {}
    completions = [[{"role": "assistant", "content": "go right"}], [{"role": "assistant", "content": "go left"}]]
    scores = asyncio.run(reward(prompts=[[{"role": "user", "content": "drive"}]] * 2, completions=completions,
                                completion_ids=[[1], [2]], task=[task, task], difficulty=["easy", "hard"],
                                trainer_state=None, log_extra=lambda *a: None,
                                log_metric=lambda k, v: logged.__setitem__(k, v)))
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    assert logged == {"pi0_reward/failed": 0.0, "pi0_reward/cached": 0.0}
    assert inspect.iscoroutinefunction(reward)  # TRL awaits it with the others (asyncio.gather)
    again = pickle.loads(pickle.dumps(reward))  # TRL's async GRPO pickles reward functions into a process
    assert again.func.__name__ == "pi0_reward" and again.keywords == reward.keywords
    client = app.app.test_client()
    job = client.get("/jobs").get_json()["jobs"][0]
    assert [d["task"]["prompt"] for d in client.get(f"/jobs/{job['id']}").get_json()["result"]["details"]] \
        == ["go right", "go left"]


def test_trl_failures_are_none_and_counted_or_raised(served, monkeypatch):
    from pi0_reward_server.integrations import trl

    app = served()
    monkeypatch.setenv("PI0_REWARD_URL", app.url)
    monkeypatch.setenv("PI0_REWARD_TASK", "cartpole_short")
    logged: dict = {}
    scores = asyncio.run(trl.reward_func(["p"] * 3, ["a", "b", "c"], task=[None, "chess", json.dumps(steps_task(4))],
                                         log_metric=lambda k, v: logged.__setitem__(k, v)))
    assert scores == [1.0, None, 0.004] and logged["pi0_reward/failed"] == 1.0
    raising = trl.make_reward_func(url=app.url, on_failure="raise")
    with pytest.raises(trl.RewardServiceError, match="1 of 1 sample.*unknown task 'chess'"):
        asyncio.run(raising(["p"], ["a"], task=["chess"]))


@pytest.mark.parametrize("limit", [{"max_responses": 8}, {"max_body_bytes": 1024}])
def test_a_request_too_big_for_the_service_is_split(served, limit):
    from pi0_reward_server.integrations.trl import make_reward_func

    app = served(**limit)
    reward = make_reward_func(url=app.url, task=json.dumps(steps_task(3)))
    assert asyncio.run(reward(["p"] * 20, ["c"] * 20)) == [0.003] * 20
    assert app.counts["POST /jobs"] >= 3  # refused whole (400 or 413), then halves until each fits


# -- across adapters: the service's answers the trainer must not mistake for scores --------------------------


def test_busy_429_is_retried_after_retry_after(served):
    from pi0_reward_server.integrations.trl import make_reward_func

    app = served(affine(gated=True), max_inflight_tasks=1)
    client = app.app.test_client()
    blocker = client.post("/jobs", json={"responses": [{"task": "cartpole_short", "episodes": 1}]})
    assert blocker.status_code == 202 and AffineModel.entered.wait(10)
    threading.Timer(1.0, AffineModel.gate.set).start()  # the blocking job ends; the retry (Retry-After: 5) fits
    started = time.monotonic()
    scores = asyncio.run(make_reward_func(url=app.url, task="cartpole_short", retries=2)(["p"], ["c"]))
    assert scores[0] is not None and time.monotonic() - started >= 4.5
    assert app.counts["POST /jobs"] == 3  # the blocker, the 429, the retry


def test_token_is_sent_and_a_missing_one_fails_without_retrying(served):
    from pi0_reward_server.integrations.trl import make_reward_func

    app = served(token="s3cret-token")
    assert asyncio.run(make_reward_func(url=app.url, token="s3cret-token", task="cartpole_short")(["p"], ["c"])) == [1.0]
    with pytest.raises(Exception, match="HTTP 401"):
        asyncio.run(make_reward_func(url=app.url, task="cartpole_short", on_failure="raise")(["p"], ["c"]))
    assert app.counts["POST /jobs"] == 2


def test_timeout_cancels_the_job_on_the_service(served):
    from pi0_reward_server.integrations.trl import make_reward_func

    app = served(affine(gated=True))
    reward = make_reward_func(url=app.url, task="cartpole_short", timeout_s=1.0, task_retries=0, on_failure="raise")
    with pytest.raises(Exception, match="timeout_s ran out.*cancelled"):
        asyncio.run(reward(["p"], ["c"]))
    job = app.app.test_client().get("/jobs").get_json()["jobs"][0]
    assert job["state"] == "cancelled"


def test_against_an_openpi_style_model_server(openpi_servers, serve_app):
    server = openpi_servers(model="gpu_worker.models.cartpole:CartPolePolicy")
    app = serve_app(model_servers=(server.url,))
    compute_score = load_like_verl(ADAPTERS / "verl.py", "compute_score", {"url": app.url})
    samples = [{"data_source": "d", "response": "r", "reward_model": {"ground_truth": json.dumps(steps_task(i + 1))}}
               for i in range(8)]
    scores, _ = asyncio.run(verl_reward_loop(compute_score, samples))
    assert scores == [pytest.approx((i + 1) / 1000) for i in range(8)] and app.counts["POST /jobs"] == 1
    assert server.frames_refused == 0 and server.requests > 0


@pytest.mark.slow
def test_trl_grpo_trainer_trains_on_the_service_rewards(served, tmp_path):
    """TRL's own GRPOTrainer (the real package) on a tiny model built offline, rewarded by the service."""
    from gpu_worker.models.lerobot import _make_torchvision_importable

    _make_torchvision_importable()  # this CPU torch beside PyPI's CUDA torchvision (transformers imports it)
    trl = pytest.importorskip("trl")
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pi0_reward_server.integrations.trl import make_reward_func

    app = served()
    words = "push pull the red blue block left right up down wait stop go".split()
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64, pad_token_id=0, eos_token_id=1))
    # Two prompts per step, four completions each: one prompt's task scores 1.0, the other's is refused.
    dataset = Dataset.from_dict({"prompt": ["push the block", "pull the block"], "task": ["cartpole_short", "chess"]})
    args = trl.GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=8, num_generations=4,
                          max_completion_length=6, max_steps=2, report_to="none", use_cpu=True, logging_steps=1,
                          save_strategy="no", bf16=False)
    trainer = trl.GRPOTrainer(model=model, processing_class=tokenizer, args=args, train_dataset=dataset,
                              reward_funcs=[make_reward_func(url=app.url)])
    trainer.train()
    steps = [log for log in trainer.state.log_history if "rewards/pi0_reward/mean" in log]
    assert len(steps) == 2
    for log in steps:
        assert log["rewards/pi0_reward/mean"] == 1.0  # the refused samples are None (NaN), left out of the mean
        assert log["pi0_reward/failed"] == 4.0 and math.isfinite(log["loss"])
    # A step's 8 completions come in one call: per step one job, after one refusal that fails the 4 copies of
    # the refused task at once.
    assert app.counts["POST /jobs"] == 4, app.counts


def test_the_documented_configurations_name_what_exists(make_app):
    """README_PARALLEL's "Use it from your trainer": every path, function, setting and variable it names."""
    import dataclasses
    import importlib
    import re

    from pi0_reward_server.integrations.remote import Options

    text = (ROOT / "README_PARALLEL.md").read_text()
    section = text[text.index("### Use it from your trainer"):text.index("`GET /pool_status`: per model server")]
    for pkg in re.findall(r"path=pkg://([\w/]+)", section):  # verl's pkg:// form: slashes become dots
        verl = importlib.import_module(pkg.replace("/", "."))
        for name in re.findall(r"custom_reward_function\.name=(\w+)", section):
            assert callable(getattr(verl, name)), name
    assert {"compute_score", "compute_score_batch"} <= set(re.findall(r"custom_reward_function\.name=(\w+)", section))
    fields = {f.name: f.default for f in dataclasses.fields(Options)}
    for name in re.findall(r"reward_kwargs\.(\w+)=", section):
        assert name in fields, name
    for module in re.findall(r"import (pi0_reward_server\.integrations\.\w+) as m", section):
        assert pathlib.Path(importlib.import_module(module).__file__).is_file()
    for dotted in re.findall(r"--reward_funcs ([\w.]+)", section) + \
            re.findall(r"from (pi0_reward_server[\w.]*) import (\w+)", section):
        module, name = dotted if isinstance(dotted, tuple) else dotted.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), name)), dotted
    rows = re.findall(r"^\| `(\w+)` \| `(PI0_REWARD_\w+)`[^|]*\| ([^|]+) \|", section, re.M)
    assert {name for name, _, _ in rows} == set(fields), "the settings table lists every setting"
    for name, env, default in rows:
        assert Options.ENV[name] == env, name
        documented = default.strip().split(" ")[0].strip("`")
        assert documented in (str(fields[name]).removesuffix(".0"), "none" if fields[name] is None else "-"), name
    for route in re.findall(r"http://<app-host>:6006(/[\w/]+)", section):
        assert route in {rule.rule for rule in make_app().url_map.iter_rules()}, route


def test_a_field_refusal_fails_its_sample_alone(served):
    from pi0_reward_server.integrations.trl import make_reward_func

    app = served()
    bad = json.dumps({"task": "cartpole_short", "return_range": [5, 1]})  # refused as responses[1].return_range
    scores = asyncio.run(make_reward_func(url=app.url)(["p"] * 3, ["c"] * 3, task=["cartpole_short", bad, "cartpole"]))
    assert scores[0] == 1.0 and scores[1] is None and scores[2] == 1.0


def test_a_caller_that_gives_up_does_not_strand_the_rest_of_its_batch(served):
    app = served(affine(gated=True))
    from pi0_reward_server.integrations.verl import compute_score

    async def main():
        calls = [asyncio.create_task(compute_score("d", "s", "cartpole_short", None, url=app.url, task_retries=0))
                 for _ in range(3)]
        await asyncio.sleep(0.5)
        calls[0].cancel()  # e.g. a trainer's own timeout around one sample
        AffineModel.gate.set()
        return await asyncio.wait_for(asyncio.gather(*calls[1:]), 30)

    results = asyncio.run(main())  # the affine model is no CartPole policy: a real, low score
    assert len(results) == 2 and [r["failed"] for r in results] == [0.0, 0.0]
    assert results[0]["score"] == results[1]["score"]


def test_numpy_ground_truths_from_parquet_are_sent_as_json(served):
    from pi0_reward_server.integrations.verl import compute_score_batch

    app = served()
    truth = {"task": np.str_("gym:CartPole-v1"), "return_range": np.array([0, 1000]), "max_steps": np.int64(6),
             "episodes": np.int64(1)}
    assert [r["score"] for r in compute_score_batch(["d"], ["s"], [truth], [{}], url=app.url)] == [0.006]


@pytest.mark.slow
def test_no_model_server_yet_503_is_retried_until_one_comes_up(start_server, serve_app):
    from pi0_reward_server.integrations.trl import make_reward_func

    port = free_port()
    app = serve_app(model_servers=(f"ws://127.0.0.1:{port}",), health_interval_s=0.2, probe_interval_s=0.2,
                    backoff_initial_s=0.1, backoff_max_s=0.5)
    threading.Timer(2.0, lambda: start_server(models=(CARTPOLE,), port=port, log_level="WARNING")).start()
    reward = make_reward_func(url=app.url, task="cartpole_short", retries=0, timeout_s=120, on_failure="raise")
    assert asyncio.run(reward(["p"], ["c"])) == [1.0]  # 503 + Retry-After, more often than `retries` allows
    assert app.counts["POST /jobs"] >= 2


def test_verl_calls_spread_over_a_rollout_share_a_job_within_the_window(served):
    """verl's agent loop calls compute_score as each generation finishes: spread out, not at once. With a
    window as long as the spread, they still become one job."""
    app = served()
    compute_score = load_like_verl(ADAPTERS / "verl.py", "compute_score", {"url": app.url, "batch_window_s": 1.0})

    async def rollout():
        async def one(i: int):
            await asyncio.sleep(0.02 * i)  # generations finishing one after another
            return await compute_score(data_source="d", solution_str="s", ground_truth=json.dumps(steps_task(i + 1)),
                                       extra_info={})
        return await asyncio.gather(*(one(i) for i in range(16)))

    results = asyncio.run(rollout())
    assert [r["score"] for r in results] == [pytest.approx((i + 1) / 1000) for i in range(16)]
    assert app.counts["POST /jobs"] == 1, app.counts
