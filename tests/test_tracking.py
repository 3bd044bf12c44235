"""A task tracker travels (pickled) to wherever its task runs: a LIBERO worker process, a Ray worker on
another node. Where the job store's SQLite file is not on that machine, the task reports nothing and
must not take its job for cancelled."""

from __future__ import annotations

import pickle

from pi0_reward_server.jobs import tracking
from pi0_reward_server.jobs.store_sqlite import SQLiteStore


def test_a_tracker_reopens_its_store_and_sees_progress_and_cancellation(tmp_path):
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    store.create_job("job1", {"responses": []}, [{"task": "x"}], [4])
    store.start_job("job1", "here")
    tracking._stores.clear()  # as in a fresh process
    remote = pickle.loads(pickle.dumps(tracking.TaskTracker(store, "job1", 0)))
    assert remote.store is not None and remote.store is not store
    remote.progress(3)
    assert store.get("job1")["tasks"][0]["units_done"] == 3
    assert not remote.cancelled()
    store.cancel("job1")
    remote._checked = 0.0  # its next look at the store is due
    assert remote.cancelled()


def test_a_tracker_on_a_machine_without_the_store_reports_nothing_and_is_not_cancelled(tmp_path):
    store = SQLiteStore(tmp_path / "here" / "jobs.sqlite3")
    store.create_job("job1", {"responses": []}, [{"task": "x"}], [4])
    store.start_job("job1", "here")
    shipped = pickle.dumps(tracking.TaskTracker(store, "job1", 0))
    tracking._stores.clear()
    (tmp_path / "here").rename(tmp_path / "elsewhere")  # the file is not where the spec says, on this machine
    remote = pickle.loads(shipped)
    assert remote.store is None and not remote.cancelled()
    remote.progress(2)  # nowhere to report: not an error
    assert not (tmp_path / "here" / "jobs.sqlite3").exists()  # and no empty store was made in its place

    other = SQLiteStore(tmp_path / "here" / "jobs.sqlite3")  # another app's store at that path, without the job
    del other
    tracking._stores.clear()
    remote = pickle.loads(shipped)
    assert remote.store is None and not remote.cancelled()
