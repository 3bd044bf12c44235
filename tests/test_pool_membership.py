"""A pool whose membership changes while the app runs: add and remove model servers without a restart,
by hand through the token-guarded admin route, followed by every app process sharing the job store."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from conftest import affine

TOKEN = "membership-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def wait_for(predicate, timeout_s: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_server_added_to_a_running_pool_serves_and_a_removed_one_takes_no_more(start_server, pools):
    first = start_server(models=(affine(),))
    second = start_server(models=(affine(),))
    pool = pools([first.url], wait=True)
    assert pool.add_server(second.url, {"node_ip": "10.0.0.2"}) is True
    assert pool.add_server(second.url, {"node_ip": "10.0.0.3"}) is False  # known: only where it runs changes
    assert pool.wait_for_servers(2, 10)
    status = {s["url"]: s for s in pool.status()["servers"]}
    assert status[second.url]["where"] == {"node_ip": "10.0.0.3"} and status[second.url]["state"] == "up"

    # The new server serves: asked for by preference, it answers.
    _, url = pool.infer({"observation/state": np.ones(2)}, prefer=second.url)
    assert url == second.url

    assert pool.remove_server(first.url) is True
    assert pool.remove_server(first.url) is False
    assert pool.urls == [second.url]
    for _ in range(5):
        _, url = pool.infer({"observation/state": np.ones(2)})
        assert url == second.url
    assert [s["url"] for s in pool.status()["servers"]] == [second.url]


def test_a_request_in_flight_on_a_removed_server_still_gets_its_answer(start_server, pools):
    from gpu_worker.models.testing import AffineModel

    gated = start_server(models=(affine(gated=True),))
    pool = pools([gated.url], wait=True)
    reply: dict = {}
    thread = threading.Thread(target=lambda: reply.update(zip(("action", "url"),
                                                                pool.infer({"observation/state": np.ones(2)}))))
    thread.start()
    assert AffineModel.entered.wait(10)
    pool.remove_server(gated.url)  # taken out mid-request
    AffineModel.gate.set()
    thread.join(10)
    assert reply["url"] == gated.url and np.allclose(reply["action"]["actions"], 3.0)
    assert pool.status()["servers"] == []  # and its connection was closed, not put back


def test_bad_server_urls_are_refused_by_name(pools, start_server):
    server = start_server(models=(affine(),))
    pool = pools([server.url])
    for bad in ("http://127.0.0.1:80", "ws://:80", "ws://host", "ws://host:notaport", 7, None):
        with pytest.raises(ValueError, match="must look like ws://host:port"):
            pool.add_server(bad)


def test_admin_route_needs_the_token(start_server, make_app):
    server = start_server(models=(affine(),))
    open_app = make_app(model_servers=(server.url,))
    response = open_app.test_client().post("/admin/pool/servers", json={"url": "ws://127.0.0.1:9"})
    assert response.status_code == 403 and "REWARD_SERVER_TOKEN" in response.get_json()["error"]
    guarded = make_app(model_servers=(server.url,), token=TOKEN).test_client()
    assert guarded.post("/admin/pool/servers", json={"url": "ws://127.0.0.1:9"}).status_code == 401
    assert guarded.delete("/admin/pool/servers", json={"url": server.url},
                          headers={"Authorization": "Bearer wrong-token"}).status_code == 401


@pytest.mark.parametrize("body, field", [
    ({"url": "http://127.0.0.1:9"}, "url"),
    ({"url": "ws://127.0.0.1"}, "url"),
    ({}, "body"),
    ({"url": "ws://127.0.0.1:9", "extra": 1}, "body"),
    ({"url": "ws://127.0.0.1:9", "where": "node-1"}, "where"),
    ({"url": "ws://127.0.0.1:9", "where": {f"k{i}": i for i in range(40)}}, "where"),
    ([1, 2], "body"),
])
def test_admin_route_names_what_is_wrong(start_server, make_app, body, field):
    server = start_server(models=(affine(),))
    client = make_app(model_servers=(server.url,), token=TOKEN).test_client()
    response = client.post("/admin/pool/servers", json=body, headers=AUTH)
    assert response.status_code == 400 and response.get_json()["field"] == field, response.get_json()


def test_every_app_process_follows_membership_changes_through_the_store(start_server, make_app):
    """Two apps on one job store stand for two gunicorn workers: a change through one reaches the other."""
    first = start_server(models=(affine(),))
    second = start_server(models=(affine(),))
    one = make_app(model_servers=(first.url,), token=TOKEN, membership_interval_s=0.1)
    other = make_app(model_servers=(first.url,), token=TOKEN, membership_interval_s=0.1)
    client, other_client = one.test_client(), other.test_client()

    added = client.post("/admin/pool/servers", json={"url": second.url, "where": {"node_ip": "10.1.2.3"}},
                        headers=AUTH)
    assert added.status_code == 201 and added.get_json()["servers"] == [first.url, second.url]
    assert client.post("/admin/pool/servers", json={"url": second.url}, headers=AUTH).status_code == 200
    other_pool = other.extensions["client_pool"]
    wait_for(lambda: second.url in other_pool.urls, what="the other app to add the server")
    wait_for(lambda: other_pool.healthy_servers == 2, what="the added server to come up")
    shown = {s["url"]: s for s in other_client.get("/pool_status", headers=AUTH).get_json()["servers"]}
    assert shown[second.url]["where"] == {"node_ip": "10.1.2.3", "source": "admin"}
    assert shown[first.url]["where"] == {"source": "config", "host": "127.0.0.1"}

    # Removing the configured server by hand: the other app follows, and scoring goes to the one left.
    removed = client.delete("/admin/pool/servers", json={"url": first.url}, headers=AUTH)
    assert removed.status_code == 200 and removed.get_json()["servers"] == [second.url]
    wait_for(lambda: other_pool.urls == [second.url], what="the other app to remove the server")
    assert client.delete("/admin/pool/servers", json={"url": first.url}, headers=AUTH).status_code == 404

    # A third app process started now begins with the membership as it stands.
    late = make_app(model_servers=(first.url,), token=TOKEN)
    assert late.extensions["client_pool"].urls == [second.url]


@pytest.mark.parametrize("overrides, message", [
    ({"execution": "cluster"}, "execution must be 'local' or 'ray'"),
    ({"ray_task_cpus": 0}, "ray_task_cpus must be a number of CPUs"),
    ({"ray_max_retries": -1}, "ray_max_retries must be an integer between 0 and 100"),
    ({"ray_address": 6379}, "ray_address must be a string"),
    ({"membership_interval_s": 0}, "membership_interval_s must be a positive number of seconds"),
])
def test_scale_out_settings_are_checked(overrides, message):
    from pi0_reward_server.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(overrides, environ={})


def test_an_openpi_style_server_added_by_hand_serves_score(start_server, openpi_servers, make_app):
    """The admin route adds any openpi-compatible server: one that takes one map per frame and hosts its one
    policy (the shipped CartPole policy here, as openpi hosts a checkpoint)."""
    configured = start_server(models=(affine(),))
    openpi = openpi_servers(model="gpu_worker.models.cartpole:CartPolePolicy")
    app = make_app(model_servers=(configured.url,), token=TOKEN)
    client = app.test_client()
    assert client.post("/admin/pool/servers", json={"url": openpi.url}, headers=AUTH).status_code == 201
    assert client.delete("/admin/pool/servers", json={"url": configured.url}, headers=AUTH).status_code == 200
    pool = app.extensions["client_pool"]
    wait_for(lambda: pool.healthy_servers == 1, what="the openpi-style server to come up")
    body = client.post("/score", headers=AUTH, json={
        "responses": [{"task": "cartpole_short", "seed": 3, "episodes": 2}]}).get_json()
    assert body["failures"] == 0 and body["scores"] == [1.0] and body["details"][0]["servers"] == [openpi.url]
    assert pool.status()["servers"][0]["server"] == "openpi-compatible"


def test_a_follower_round_cannot_undo_an_addition_made_while_it_ran(start_server, make_app):
    """The follower reads the store, then changes the pool; an admin addition landing between the two must
    not be undone by the stale read (it would be, for this process, until the next round)."""
    first = start_server(models=(affine(),))
    second = start_server(models=(affine(),))
    app = make_app(model_servers=(first.url,), token=TOKEN, membership_interval_s=0.05)
    store, pool = app.extensions["job_store"], app.extensions["client_pool"]
    armed, read, written, applied = (threading.Event() for _ in range(4))
    real_members, real_set_member, real_set_servers = store.members, store.set_member, pool.set_servers

    def members():
        found = real_members()
        if armed.is_set() and threading.current_thread().name == "pool-membership" and not read.is_set():
            read.set()
            written.wait(2.0)  # an admin write that nothing holds back lands here, after the read
        return found

    def set_member(*args, **kwargs):
        real_set_member(*args, **kwargs)
        written.set()

    def set_servers(*args, **kwargs):
        changed = real_set_servers(*args, **kwargs)
        if read.is_set() and threading.current_thread().name == "pool-membership":
            app.extensions["stop_membership"].set()  # no later round to repair what this one did
            applied.set()
        return changed

    store.members, store.set_member, pool.set_servers = members, set_member, set_servers
    armed.set()
    assert read.wait(10), "the follower did not run"
    added = app.test_client().post("/admin/pool/servers", json={"url": second.url, "where": {}}, headers=AUTH)
    assert added.status_code == 201
    assert applied.wait(10), "the follower's round did not end"
    assert pool.urls == [first.url, second.url]


def test_a_removal_through_a_process_that_has_not_followed_the_addition_yet_is_recorded(start_server, make_app):
    """Under gunicorn a DELETE may reach a worker that has not yet followed a POST made through another one:
    the removal must still be recorded (from the store), not refused with a 404 that leaves the server in."""
    first = start_server(models=(affine(),))
    second = start_server(models=(affine(),))
    one = make_app(model_servers=(first.url,), token=TOKEN, membership_interval_s=3600)
    behind = make_app(model_servers=(first.url,), token=TOKEN, membership_interval_s=3600)
    assert one.test_client().post("/admin/pool/servers", json={"url": second.url},
                                  headers=AUTH).status_code == 201
    assert second.url not in behind.extensions["client_pool"].urls  # it follows only every hour
    removed = behind.test_client().delete("/admin/pool/servers", json={"url": second.url}, headers=AUTH)
    assert removed.status_code == 200 and removed.get_json()["servers"] == [first.url]
    assert one.extensions["job_store"].members()[second.url]["member"] is False
    # Unknown to every process and to the store: still a 404.
    assert behind.test_client().delete("/admin/pool/servers", json={"url": "ws://127.0.0.1:9"},
                                       headers=AUTH).status_code == 404


def test_the_app_registrar_takes_a_404_on_removal_as_done(start_server, serve_app):
    from pi0_reward_server.scale.ray_servers import AppRegistrar

    server = start_server(models=(affine(),))
    app = serve_app(model_servers=(server.url,), token=TOKEN)
    AppRegistrar(app.url, TOKEN, attempts=1).remove("ws://127.0.0.1:9")  # never registered: no error
    with pytest.raises(RuntimeError, match="answered 401"):
        AppRegistrar(app.url, "not-the-token", attempts=1).remove(server.url)


def test_an_injected_pool_keeps_its_servers(start_server, pools):
    """create_app(pool=...) starts from the pool's servers, not the configured list: only additions and
    removals recorded in the store change it."""
    from conftest import close_app

    from pi0_reward_server.app import create_app

    first = start_server(models=(affine(),))
    second = start_server(models=(affine(),))
    pool = pools([first.url, second.url], wait=True)
    app = create_app({"model_servers": ("ws://127.0.0.1:9",), "log_level": "WARNING", "token": TOKEN}, pool=pool)
    try:
        assert pool.urls == [first.url, second.url]
        assert app.test_client().delete("/admin/pool/servers", json={"url": first.url},
                                         headers=AUTH).status_code == 200
        assert pool.urls == [second.url]
    finally:
        close_app(app)


def test_a_removed_servers_gauges_are_dropped(start_server, pools):
    from prometheus_client import REGISTRY

    server = start_server(models=(affine(),))
    pool = pools([server.url], wait=True)
    pool.infer({"observation/state": np.ones(2)})
    wait_for(lambda: REGISTRY.get_sample_value("reward_pool_server_up", {"server": server.url}) == 1.0,
             what="the health thread to report the server up")
    assert pool.remove_server(server.url)
    assert REGISTRY.get_sample_value("reward_pool_server_up", {"server": server.url}) is None
    assert REGISTRY.get_sample_value("reward_pool_server_in_flight", {"server": server.url}) is None


def test_set_servers_adds_removes_and_updates_where_in_one_step(start_server, pools):
    first = start_server(models=(affine(),))
    second = start_server(models=(affine(),))
    pool = pools([first.url], wait=True)
    assert pool.set_servers([second.url, first.url], {first.url: {"node_ip": "10.0.0.1"}}) == ([second.url], [])
    assert pool.urls == [first.url, second.url]
    assert {s["url"]: s["where"] for s in pool.status()["servers"]}[first.url] == {"node_ip": "10.0.0.1"}
    assert pool.set_servers([second.url]) == ([], [first.url])
    assert pool.urls == [second.url]


def test_a_server_removed_while_a_connection_to_it_opens_gets_no_request(start_server, pools):
    """The connection that was opening when its server left is closed; the request goes to another server."""
    import contextlib

    from gpu_worker.client import ModelClient

    leaving = start_server(models=(affine(),))
    staying = start_server(models=(affine(),))
    armed, opening, proceed = threading.Event(), threading.Event(), threading.Event()

    def factory(url, **options):
        if armed.is_set() and url == leaving.url:
            opening.set()
            assert proceed.wait(10)
        return ModelClient(url, **options)

    pool = pools([leaving.url, staying.url], wait=True, connections_per_server=1, client_factory=factory)
    with contextlib.ExitStack() as held:
        # Both opened-ahead connections borrowed: the next request must open a new one.
        held.enter_context(pool.connection())
        held.enter_context(pool.connection())
        armed.set()
        reply: dict = {}
        thread = threading.Thread(target=lambda: reply.update(zip(("action", "url"), pool.infer(
            {"observation/state": np.ones(2)}, prefer=leaving.url))))
        thread.start()
        assert opening.wait(10)
        pool.remove_server(leaving.url)
        proceed.set()
        thread.join(20)
    assert reply["url"] == staying.url


def test_a_lazy_pool_comes_up_on_healthz_and_connects_on_first_use(start_server, pools):
    server = start_server(models=(affine(),))
    pool = pools([server.url], wait=True, lazy_connections=True)
    [shown] = pool.status()["servers"]
    assert shown["state"] == "up" and shown["idle_connections"] == 0
    _, url = pool.infer({"observation/state": np.ones(2)})
    assert url == server.url and pool.status()["servers"][0]["idle_connections"] == 1


def test_a_launcher_name_lets_a_new_launcher_remove_what_a_killed_one_left(start_server, serve_app):
    """Membership never expires: a launcher killed by SIGKILL leaves its servers registered. One started
    later under the same name deregisters them first, and nothing registered under another name."""
    from pi0_reward_server.scale.ray_servers import AppRegistrar

    configured = start_server(models=(affine(),))
    app = serve_app(model_servers=(configured.url,), token=TOKEN)
    killed = AppRegistrar(app.url, TOKEN, launcher="gpu-nodes")
    killed.add("ws://127.0.0.1:9", {"source": "ray"})
    AppRegistrar(app.url, TOKEN, launcher="cpu-nodes").add("ws://127.0.0.1:10", {"source": "ray"})
    AppRegistrar(app.url, TOKEN).add("ws://127.0.0.1:11", {"source": "ray"})
    pool = app.app.extensions["client_pool"]
    assert pool.urls == [configured.url, "ws://127.0.0.1:9", "ws://127.0.0.1:10", "ws://127.0.0.1:11"]
    assert AppRegistrar(app.url, TOKEN, launcher="gpu-nodes").remove_stale() == ["ws://127.0.0.1:9"]
    assert pool.urls == [configured.url, "ws://127.0.0.1:10", "ws://127.0.0.1:11"]
    assert AppRegistrar(app.url, TOKEN).remove_stale() == []  # no name: nothing is its own
