"""Jobs end to end: submit, progress, server-sent events, cancel, restarts, idempotency, the result cache,
responses as prompts, and what a user gets for bad ids, bodies, credentials and an unusable store."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import time

import pytest

from conftest import affine
from gpu_worker.config import ModelConfig
from test_gunicorn_edges import Gunicorn

CARTPOLE = ModelConfig.parse("cartpole=gpu_worker.models.cartpole:CartPolePolicy")
# MountainCar with a constant push never reaches the flag: 200 steps an episode, whatever the policy does.
LONG_TASK = {"task": "gym:MountainCar-v0", "return_range": [-200, 0], "episodes": 2, "max_steps": 200}


def wait_for(predicate, timeout: float = 30, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(every)


def events(response) -> list[tuple[str, dict]]:
    """Parse a server-sent event stream: [(event, data)]."""
    out, name, data = [], None, []
    for line in b"".join(response.response).decode().splitlines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif not line and name:
            out.append((name, json.loads("\n".join(data))))
            name, data = None, []
    return out


def test_a_job_reports_monotonic_progress_and_a_complete_event_stream(start_server, make_app):
    server = start_server(models=(affine(delay_s=0.002),), log_level="WARNING")
    app = make_app(model_servers=(server.url,))
    client = app.test_client()
    body = {"responses": [LONG_TASK] * 3, "reward_function_kwargs": {"max_workers": 1}}
    submitted = client.post("/jobs", json=body)
    assert submitted.status_code == 202, submitted.get_json()
    job_id = submitted.get_json()["id"]
    assert submitted.headers["Location"] == f"/jobs/{job_id}"
    stream = events(client.get(f"/jobs/{job_id}/events"))  # follows the job to its end
    kinds = [name for name, _ in stream]
    assert kinds[-1] == "result" and set(kinds[:-1]) == {"progress"}
    done_units = [data["units"]["done"] for name, data in stream if name == "progress"]
    assert done_units == sorted(done_units) and len(set(done_units)) >= 3  # episode granularity, never backwards
    result = stream[-1][1]
    assert result["state"] == "done" and result["units"] == {"total": 6, "done": 6}
    assert result["result"]["scores"] == [0.0, 0.0, 0.0] and result["result"]["failures"] == 0
    view = client.get(f"/jobs/{job_id}").get_json()
    assert view["state"] == "done" and view["tasks"] == {"total": 3, "done": 3} and view["progress"] == 1.0
    listing = client.get("/jobs?limit=5").get_json()
    assert listing["total"] == 1 and listing["jobs"][0]["id"] == job_id and listing["jobs"][0]["done"] == 3


def test_cancel_stops_the_work_and_no_more_inference_is_sent(start_server, make_app):
    server = start_server(models=(affine(delay_s=0.005),), log_level="WARNING")
    calls = server.server.models["affine"].policy.calls
    app = make_app(model_servers=(server.url,))
    client = app.test_client()
    job_id = client.post("/jobs", json={"responses": [LONG_TASK] * 8,
                                        "reward_function_kwargs": {"max_workers": 2}}).get_json()["id"]
    wait_for(lambda: client.get(f"/jobs/{job_id}").get_json()["units"]["done"] >= 1)
    cancelled = client.delete(f"/jobs/{job_id}")
    assert cancelled.status_code == 200 and cancelled.get_json()["state"] == "cancelled"
    final = wait_for(lambda: (v := client.get(f"/jobs/{job_id}").get_json()).get("result") and v)
    assert final["state"] == "cancelled"
    settled = len(calls)
    time.sleep(1.0)
    assert len(calls) == settled  # the model server got nothing more for this job
    assert final["result"]["failures"] >= 6  # the tasks that never finished
    assert client.delete(f"/jobs/{job_id}").get_json()["state"] == "cancelled"  # idempotent


def test_idempotent_resubmission_returns_the_same_job(start_server, make_app):
    server = start_server(models=(CARTPOLE,), log_level="WARNING")
    client = make_app(model_servers=(server.url,)).test_client()
    body = {"responses": ["cartpole_short"], "reward_function_kwargs": {"episodes": 1}}
    first = client.post("/jobs", json=body, headers={"Idempotency-Key": "trainer-step-17"})
    again = client.post("/jobs", json=body, headers={"Idempotency-Key": "trainer-step-17"})
    other = client.post("/jobs", json=body, headers={"Idempotency-Key": "trainer-step-18"})
    assert first.status_code == again.status_code == 202
    assert first.get_json()["id"] == again.get_json()["id"] != other.get_json()["id"]
    assert first.get_json()["created"] and not again.get_json()["created"]
    assert client.get("/jobs").get_json()["total"] == 2


def test_cached_results_hit_and_a_changed_model_version_misses(start_server, make_app, tmp_path):
    import torch

    server = start_server(models=(CARTPOLE,), log_level="WARNING")
    body = {"responses": [{"task": "cartpole_short", "seed": 3}, {"task": "cartpole_short", "seed": 4}],
            "reward_function_kwargs": {"episodes": 2}}
    client = make_app(model_servers=(server.url,)).test_client()
    first = client.post("/score", json=body).get_json()
    requests_after_first = client.get("/pool_status").get_json()["totals"]["requests"]
    second = client.post("/score", json=body).get_json()
    assert [d["cached"] for d in first["details"]] == [False, False]
    assert [d["cached"] for d in second["details"]] == [True, True] and second["cached"] == 2
    assert second["scores"] == first["scores"]
    assert client.get("/pool_status").get_json()["totals"]["requests"] == requests_after_first  # nothing was run
    fresh = client.post("/score", json={**body, "reward_function_kwargs": {"episodes": 2, "cache": False}}).get_json()
    assert [d["cached"] for d in fresh["details"]] == [False, False]

    # The same checkpoint file name with other weights: another version, so the cache misses.
    shipped = pathlib.Path(__file__).resolve().parents[1] / "gpu_worker" / "checkpoints" / "cartpole_mlp.pt"
    state = torch.load(shipped, weights_only=True)
    state = {k: v + 0.01 for k, v in state.items()}
    changed = tmp_path / "cartpole_mlp.pt"
    torch.save(state, changed)
    retrained = start_server(models=(ModelConfig(name="cartpole", target=CARTPOLE.target, checkpoint=str(changed)),),
                             log_level="WARNING")
    after = make_app(model_servers=(retrained.url,)).test_client().post("/score", json=body).get_json()
    assert [d["cached"] for d in after["details"]] == [False, False]
    assert after["details"][0]["servers"] == [retrained.url]


def test_an_openpi_server_reports_no_version_so_nothing_is_cached(make_app):
    from openpi_style_server import OpenpiStyleServer

    server = OpenpiStyleServer(model=CARTPOLE.target).start()
    try:
        client = make_app(model_servers=(server.url,)).test_client()
        body = {"responses": ["cartpole_short"], "reward_function_kwargs": {"episodes": 1}}
        client.post("/score", json=body)
        again = client.post("/score", json=body).get_json()
        assert again["details"][0]["cached"] is False
    finally:
        server.stop()


def test_responses_are_used_as_the_prompt_of_the_named_task(start_server, make_app):
    server = start_server(models=(ModelConfig(name="prompt", target="gpu_worker.models.testing:PromptModel"),),
                          log_level="WARNING")
    client = make_app(model_servers=(server.url,)).test_client()
    texts = ["push the cart to the left", "keep the pole upright"]
    response = client.post("/score", json={"responses": texts, "reward_function_kwargs": {
        "task": "gym:MountainCar-v0", "return_range": [-200, 0], "max_steps": 5, "response_as": "prompt",
        "episodes": 1, "model": "prompt"}})
    body = response.get_json()
    assert response.status_code == 200, body
    assert [d["task"]["prompt"] for d in body["details"]] == texts
    for kwargs, message in [
        ({"response_as": "prompt"}, "must name the task each response is the prompt of"),
        ({"task": "cartpole", "response_as": "plan"}, "response_as: must be one of ['prompt']"),
        ({"task": "connect4_match", "response_as": "prompt"}, "do not apply to selfplay tasks"),
    ]:
        bad = client.post("/score", json={"responses": texts, "reward_function_kwargs": kwargs})
        assert bad.status_code == 400 and message in bad.get_json()["error"], bad.get_json()
    empty = client.post("/score", json={"responses": [""], "reward_function_kwargs": {
        "task": "cartpole_short", "response_as": "prompt"}})
    assert empty.status_code == 400 and "must be a prompt of 1 to 4096 characters" in empty.get_json()["error"]


def test_bad_ids_bodies_and_credentials_on_every_job_route(start_server, make_app):
    server = start_server(models=(CARTPOLE,), log_level="WARNING")
    client = make_app(model_servers=(server.url,), token="open-sesame").test_client()
    auth = {"Authorization": "Bearer open-sesame"}
    for method, path in [("POST", "/jobs"), ("GET", "/jobs"), ("GET", "/jobs/abc"), ("DELETE", "/jobs/abc"),
                         ("GET", "/jobs/abc/events")]:
        assert client.open(path, method=method, json={}).status_code == 401, (method, path)
    for method, path in [("GET", "/jobs/0123456789abcdef"), ("DELETE", "/jobs/0123456789abcdef"),
                         ("GET", "/jobs/0123456789abcdef/events"), ("GET", "/jobs/..%2Fetc"), ("GET", "/jobs/" + "a" * 65)]:
        response = client.open(path, method=method, headers=auth)
        assert response.status_code == 404 and response.get_json()["error"], (method, path)
    for body, message in [({"responses": "cartpole"}, "responses: must be a list"),
                          ({"responses": ["chess"]}, "unknown task 'chess'"),
                          ({"responses": ["cartpole"], "reward_function_kwargs": {"cache": "no"}}, "cache: must be true or false")]:
        response = client.post("/jobs", json=body, headers=auth)
        assert response.status_code == 400 and message in response.get_json()["error"], body
    bad_key = client.post("/jobs", json={"responses": ["cartpole_short"]}, headers={**auth, "Idempotency-Key": "x" * 201})
    assert bad_key.status_code == 400 and "Idempotency-Key" in bad_key.get_json()["error"]
    for query in ("limit=0", "limit=abc", "offset=-1"):
        assert client.get(f"/jobs?{query}", headers=auth).status_code == 400


@pytest.mark.parametrize("damage", ["data_dir is a file", "not a database"])
def test_an_unusable_store_gives_a_clear_503_and_the_app_keeps_serving(start_server, make_app, tmp_path, damage):
    server = start_server(models=(CARTPOLE,), log_level="WARNING")
    if damage == "data_dir is a file":
        data_dir = tmp_path / "plain-file"
        data_dir.write_text("not a directory")
        expected = "cannot create the data directory"
    else:
        data_dir = tmp_path / "garbage"
        data_dir.mkdir()
        (data_dir / "jobs.sqlite3").write_bytes(os.urandom(4096))
        expected = "job store"
    app = make_app(model_servers=(server.url,), data_dir=str(data_dir))
    client = app.test_client()
    for method, path in [("POST", "/score"), ("POST", "/jobs"), ("GET", "/jobs")]:
        response = client.open(path, method=method, json={"responses": ["cartpole_short"]})
        assert response.status_code == 503 and expected in response.get_json()["error"], response.get_json()
        assert response.headers["Retry-After"] == "5"
    assert client.get("/health").status_code == 200  # what needs no store still works


@pytest.mark.slow
def test_jobs_across_gunicorn_workers_and_a_killed_app(start_server, tmp_path):
    """Two workers share the store; SIGKILL the whole app mid-job, start it again on the same data_dir:
    the finished job is served intact, the unfinished one is marked failed with the reason."""
    server = start_server(models=(affine(delay_s=0.005),), log_level="WARNING")
    env = {"MODEL_SERVERS": server.url, "GUNICORN_WORKERS": "2", "REWARD_DATA_DIR": str(tmp_path / "data"),
           "REWARD_JOB_STALE_S": "10"}
    first = Gunicorn(tmp_path, env)
    try:
        status, _, body = first.request("POST", "/jobs", json.dumps({"responses": ["cartpole_short"],
                                        "reward_function_kwargs": {"episodes": 1}}).encode(),
                                        {"Content-Type": "application/json"})
        assert status == 202
        done_id = json.loads(body)["id"]
        workers = set()

        def finished() -> bool:
            status, headers, body = first.request("GET", f"/jobs/{done_id}")
            workers.add(headers.get("X-Reward-Worker"))
            return status == 200 and json.loads(body)["state"] == "done"

        wait_for(finished, every=0.02)
        status, _, body = first.request("POST", "/jobs", json.dumps({"responses": [LONG_TASK] * 6,
                                        "reward_function_kwargs": {"max_workers": 1}}).encode(),
                                        {"Content-Type": "application/json"})
        long_id = json.loads(body)["id"]
        wait_for(lambda: json.loads(first.request("GET", f"/jobs/{long_id}")[2])["tasks"]["done"] >= 1)
        for _ in range(300):  # any worker answers for any job: keep asking until both have
            status, headers, _ = first.request("GET", f"/jobs/{long_id}")
            assert status == 200
            workers.add(headers.get("X-Reward-Worker"))
            if len(workers - {None}) == 2:
                break
    finally:
        children = [int(p.parent.name) for p in pathlib.Path("/proc").glob("[0-9]*/stat")
                    if _ppid(p) == first.proc.pid]
        first.proc.kill()  # as a crash or the OOM killer would: no drain, no cleanup
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        first.proc.wait(30)
    assert len(workers - {None}) == 2
    second = Gunicorn(tmp_path, {**env, "GUNICORN_WORKERS": "1"})
    try:
        finished_job = json.loads(second.request("GET", f"/jobs/{done_id}")[2])
        assert finished_job["state"] == "done" and finished_job["result"]["scores"] == [0.0]
        assert finished_job["result"]["failures"] == 0
        failed = wait_for(lambda: (j := json.loads(second.request("GET", f"/jobs/{long_id}")[2]))["state"] == "failed"
                          and j, timeout=60, every=0.2)
        assert "stopped before it finished" in failed["error"]
        assert failed["tasks"]["done"] >= 1 and failed["partial_scores"][0] == 0.0  # finished tasks kept
    finally:
        second.stop()


def _ppid(stat: pathlib.Path) -> int | None:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


@pytest.mark.slow
def test_example_client_follows_a_job_through_its_event_stream(start_server, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    server = start_server(models=(CARTPOLE,), log_level="WARNING")
    app = Gunicorn(tmp_path, {"MODEL_SERVERS": server.url, "REWARD_SERVER_TOKEN": "a-long-enough-token"})
    try:
        done = subprocess.run([sys.executable, str(ROOT / "example_client.py"), "--url", f"http://127.0.0.1:{app.port}",
                               "--token", "a-long-enough-token", "--job", "--tasks", "cartpole_short",
                               '{"task": "cartpole", "max_steps": 50, "success_threshold": 50}', "--episodes", "3"],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "job " in done.stdout and "2 task(s) scored" in done.stdout
        assert "6/6" in done.stderr  # the progress bar reached every episode (tqdm writes to stderr)
    finally:
        app.stop()


def test_score_never_waits_behind_jobs_and_a_queued_cancel_frees_everything_at_once(start_server, make_app):
    server = start_server(models=(affine(delay_s=0.005),), log_level="WARNING")
    app = make_app(model_servers=(server.url,), max_concurrent_jobs=1)
    client = app.test_client()
    admission = app.extensions["admission"]
    running = client.post("/jobs", json={"responses": [LONG_TASK] * 6, "reward_function_kwargs": {"max_workers": 1}})
    queued = client.post("/jobs", json={"responses": [LONG_TASK] * 3}).get_json()["id"]
    wait_for(lambda: client.get(f"/jobs/{running.get_json()['id']}").get_json()["state"] == "running")
    assert client.get(f"/jobs/{queued}").get_json()["state"] == "queued"  # the one job slot is taken
    scored = client.post("/score", json={"responses": [{"task": "cartpole_short", "seed": 1}],
                                         "reward_function_kwargs": {"episodes": 1}})
    assert scored.status_code == 200 and scored.get_json()["failures"] == 0  # /score did not queue behind them
    before = admission.inflight
    assert client.delete(f"/jobs/{queued}").get_json()["state"] == "cancelled"
    assert admission.inflight == before - 3  # freed now, not when the queue reaches it
    client.delete(f"/jobs/{running.get_json()['id']}")


def test_an_idempotency_key_reused_with_another_body_is_refused(start_server, make_app):
    server = start_server(models=(CARTPOLE,), log_level="WARNING")
    client = make_app(model_servers=(server.url,)).test_client()
    first = client.post("/jobs", json={"responses": ["cartpole_short"]}, headers={"Idempotency-Key": "step-9"})
    other = client.post("/jobs", json={"responses": ["cartpole"]}, headers={"Idempotency-Key": "step-9"})
    assert other.status_code == 422 and other.get_json()["job_id"] == first.get_json()["id"]
    assert "different body" in other.get_json()["error"]


def test_score_of_a_job_cancelled_meanwhile_is_409_not_rewards(start_server, make_app):
    import threading

    server = start_server(models=(affine(delay_s=0.005),), log_level="WARNING")
    app = make_app(model_servers=(server.url,))
    client = app.test_client()
    answer: dict = {}
    thread = threading.Thread(target=lambda: answer.update(r=client.post(
        "/score", json={"responses": [LONG_TASK] * 4, "reward_function_kwargs": {"max_workers": 1}})))
    thread.start()
    job_id = wait_for(lambda: (page := client.get("/jobs").get_json()["jobs"]) and page[0]["state"] == "running"
                      and page[0]["id"])
    client.delete(f"/jobs/{job_id}")
    thread.join(60)
    response = answer["r"]
    assert response.status_code == 409 and response.get_json()["state"] == "cancelled"
    assert response.get_json()["partial"]["failures"] >= 1
