"""The job store contract, against every backend: SQLite, Redis (a real redis-server started here) and
the in-memory baseline; and the app running jobs on Redis end to end."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest

from pi0_reward_server.jobs.store_memory import MemoryStore
from pi0_reward_server.jobs.store_sqlite import SQLiteStore


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install redis-server (scripts/install_redis.sh)")
        pytest.skip("redis-server is not installed (scripts/install_redis.sh)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    deadline = time.monotonic() + 20
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(params=["sqlite", "redis", "memory"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return SQLiteStore(tmp_path / "jobs.sqlite3")
    if request.param == "memory":
        return MemoryStore()
    from pi0_reward_server.jobs.store_redis import RedisStore

    return RedisStore(request.getfixturevalue("redis_url"), prefix=f"test{time.monotonic_ns()}")


def test_the_store_contract(store):
    job_id, created = store.create_job("j1", {"responses": ["a", "b"]}, [{"n": 1}, {"n": 2}], [3, 1],
                                       idempotency_key="k1")
    assert (job_id, created) == ("j1", True)
    assert store.create_job("j2", {}, [{"n": 1}], [1], idempotency_key="k1") == ("j1", False)
    assert store.state("j1") == "queued" and store.state("nope") is None and store.get("nope") is None
    assert store.start_job("j1", "host:1") and not store.start_job("j1", "host:1")
    store.progress("j1", 0, 2)
    job = store.get("j1")
    assert job["state"] == "running" and job["request"] == {"responses": ["a", "b"]} and job["total"] == 2
    assert [(t["state"], t["units_done"], t["units_total"]) for t in job["tasks"]] == [("running", 2, 3), ("queued", 0, 1)]
    store.finish_task("j1", 0, 0.5, {"score": 0.5, "error": None})
    store.finish_task("j1", 1, 0.0, {"score": 0.0, "error": "boom"}, cached=True)
    tasks = store.get("j1")["tasks"]
    assert [(t["state"], t["score"], t["units_done"], t["cached"]) for t in tasks] == [("done", 0.5, 3, 0), ("failed", 0.0, 1, 1)]
    store.finish_job("j1", "done", {"scores": [0.5, 0.0]})
    store.finish_job("j1", "failed", error="late")  # an ended job is never rewritten
    job = store.get("j1")
    assert job["state"] == "done" and job["result"] == {"scores": [0.5, 0.0]} and job["error"] is None
    assert store.cancel("j1") == "done" and store.cancel("nope") is None

    store.create_job("j3", {}, [{"n": 1}, {"n": 2}], [1, 1])
    store.start_job("j3", "host:1")
    assert store.cancel("j3") == "cancelled"
    store.finish_task("j3", 0, 0.0, {"score": 0.0, "error": "JobCancelled"})
    store.finish_job("j3", "done", {"scores": [0.0, 0.0]})  # cancelled stays cancelled, but keeps its result
    job = store.get("j3")
    assert job["state"] == "cancelled" and job["result"] == {"scores": [0.0, 0.0]}
    assert [t["state"] for t in job["tasks"]] == ["cancelled", "cancelled"]

    page, total = store.list(limit=2, offset=0)
    assert total == 2 and [j["id"] for j in page] == ["j3", "j1"] and page[1]["done"] == 2
    assert store.list_active() == []  # both ended
    store.create_job("j4", {}, [{"n": 1}], [1])
    time.sleep(0.01)
    store.create_job("j5", {}, [{"n": 1}, {"n": 2}], [1, 1])
    store.start_job("j5", "host:1")
    store.finish_task("j5", 0, 1.0, {"score": 1.0, "error": None})
    active = store.list_active()
    assert [(j["id"], j["state"], j["done"]) for j in active] == [("j5", "running", 1), ("j4", "queued", 0)]
    assert [j["id"] for j in store.list_active(1)] == ["j5"]
    assert store.cached("key") is None
    store.remember("key", {"score": 1.0})
    assert store.cached("key") == {"score": 1.0}


def test_stale_jobs_fail_with_the_reason_and_old_jobs_expire(store):
    if isinstance(store, MemoryStore):
        pytest.skip("an in-memory store's jobs die with its process")
    store.create_job("old", {}, [{"n": 1}, {"n": 2}], [1, 1])
    store.start_job("old", "host:1")
    store.finish_task("old", 0, 1.0, {"score": 1.0, "error": None})
    time.sleep(0.3)
    store.create_job("fresh", {}, [{"n": 1}], [1])
    store.start_job("fresh", "host:2")
    assert store.fail_stale(0.2) == ["old"]
    job = store.get("old")
    assert job["state"] == "failed" and "stopped before it finished" in job["error"]
    assert [t["state"] for t in job["tasks"]] == ["done", "failed"] and job["tasks"][0]["score"] == 1.0
    assert store.get("fresh")["state"] == "running"
    time.sleep(0.3)
    assert store.expire(0.2) == 1 and store.get("old") is None and store.get("fresh") is not None


def test_jobs_run_on_the_redis_store_end_to_end(redis_url, start_server):
    from conftest import affine
    from pi0_reward_server.app import create_app

    server = start_server(models=(affine(),), log_level="WARNING")
    app = create_app({"model_servers": (server.url,), "job_store": "redis", "redis_url": redis_url,
                      "log_level": "WARNING"})
    try:
        client = app.test_client()
        body = {"responses": [{"task": "cartpole_short", "seed": i} for i in range(3)],
                "reward_function_kwargs": {"episodes": 2}}
        job_id = client.post("/jobs", json=body).get_json()["id"]
        stream = client.get(f"/jobs/{job_id}/events").get_data(as_text=True)
        assert "event: result" in stream
        view = client.get(f"/jobs/{job_id}").get_json()
        assert view["state"] == "done" and view["units"] == {"total": 6, "done": 6}
        again = client.post("/score", json=body).get_json()
        assert again["cached"] == 3  # the cache lives in Redis too
    finally:
        app.extensions["job_runner"].close()
        app.extensions["client_pool"].close()


def test_an_unreachable_redis_is_a_clear_503(start_server):
    from pi0_reward_server.app import create_app

    server = start_server(log_level="WARNING")
    app = create_app({"model_servers": (server.url,), "job_store": "redis",
                      "redis_url": f"redis://:hunter2secret@127.0.0.1:{free_port()}/0", "log_level": "WARNING"})
    try:
        response = app.test_client().post("/score", json={"responses": ["cartpole_short"]})
        error = response.get_json()["error"]
        assert response.status_code == 503 and "cannot reach the Redis job store" in error
        assert "hunter2secret" not in error  # the password never reaches a message
    finally:
        app.extensions["job_runner"].close()
        app.extensions["client_pool"].close()


def test_a_full_database_is_a_store_error_that_names_it(tmp_path):
    from pi0_reward_server.jobs.store_sqlite import StoreError

    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    db = store._db()
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages + 2}")  # as a full disk would: no room for more pages
    with pytest.raises(StoreError, match="database or disk is full"):
        for i in range(1000):
            store.create_job(f"j{i}", {"responses": ["x" * 2000]}, [{"n": n} for n in range(20)], [1] * 20)
    assert store.get("j0") is not None  # what was written before stays readable


def test_pool_membership_is_recorded_and_read_back(store):
    """Model servers added or removed while the apps run: the last word per URL, with where it runs."""
    assert store.members() == {}
    store.set_member("ws://10.0.0.1:8000", True, {"node_ip": "10.0.0.1", "source": "ray"})
    store.set_member("ws://10.0.0.2:8000", True)
    store.set_member("ws://10.0.0.2:8000", False)
    members = store.members()
    assert set(members) == {"ws://10.0.0.1:8000", "ws://10.0.0.2:8000"}
    assert members["ws://10.0.0.1:8000"]["member"] is True
    assert members["ws://10.0.0.1:8000"]["where"] == {"node_ip": "10.0.0.1", "source": "ray"}
    assert members["ws://10.0.0.2:8000"]["member"] is False and members["ws://10.0.0.2:8000"]["where"] == {}
    assert all(isinstance(m["updated"], float) for m in members.values())
