"""The benchmark script still runs end to end (tiny settings; its figures are not checked)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_gpu_worker_benchmark_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_gpu_worker.py"), "--duration", "0.3", "--latency-n", "20",
         "--clients", "1,2", "--compute-width", "128", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Throughput" in result.stdout
    figures = json.loads(out.read_text())
    assert set(figures["throughput"]) == {"1", "2"}
    assert figures["throughput"]["2"]["gpu_worker"]["requests_per_s"] > 0
    assert set(figures["latency"]) == {"state-only", "libero-sized"}


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pins the server and the load generator to two CPUs")
def test_side_by_side_and_batch_wait_benchmarks_run(tmp_path):
    side, wait = tmp_path / "side.json", tmp_path / "wait.json"
    for flags, out in ((["--side-by-side", "--pin", "--models", "small", "--clients", "1,2"], side),
                       (["--batch-wait", "0:0,5:0.3", "--rounds", "1", "--models", "small", "--clients", "1,2"], wait)):
        result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu_worker.py"), *flags, "--duration", "0.3",
                                 "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(side.read_text())["side_by_side"]["small"]["throughput"]
    assert set(rows) == {"1", "2"}
    for row in rows.values():
        assert row["websockets_floor"]["requests_per_s"] > 0 and row["serial"]["requests_per_s"] > 0
        assert 0 < row["ceiling_rps"] < row["direct_batched_rps"]
    settings = json.loads(wait.read_text())["batch_wait"]["small"]
    assert set(settings) == {"0:0", "5:0.3"}
    assert all(run["2"]["requests_per_s"] > 0 and run["random_8"]["p50_ms"] > 0 for runs in settings.values() for run in runs)
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu_worker.py"), "--batch-wait", "5"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "expected MS:MS pairs" in bad.stderr


@pytest.mark.slow
def test_paths_benchmark_runs_two_trees_and_refuses_a_tree_without_gpu_worker(tmp_path):
    out = tmp_path / "paths.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_paths.py"), "--base-tree", str(ROOT),
                             "--rounds", "1", "--requests", "10", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    for label in ("base", "head"):
        assert runs[label][0]["libero_1_client"]["p50_ms"] > 0 and runs[label][0]["tasks_per_s_4_workers"] > 0
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_paths.py"), "--base-tree", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "no gpu_worker package" in bad.stderr


@pytest.mark.slow
def test_score_and_load_benchmarks_run(tmp_path):
    score_out, load_out = tmp_path / "score.json", tmp_path / "load.json"
    for args, out in (
        (["bench_score.py", "--tasks", "4", "--steps", "3", "--repeats", "1", "--workers", "1,2",
          "--layer-tasks", "4", "--layer-repeats", "1"], score_out),
        (["bench_load.py", "--clients", "2", "--seconds", "1", "--warmup", "0.5"], load_out),
    ):
        result = subprocess.run([sys.executable, str(ROOT / "bench" / args[0]), *args[1:], "--out", str(out)],
                                capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
    assert len(json.loads(score_out.read_text())["points"]) == 4
    phases = json.loads(load_out.read_text())["phases"]
    assert [p["errors"] for p in phases] == [0, 0] and all(p["requests"] > 0 for p in phases)


@pytest.mark.slow
def test_jobs_and_lerobot_benchmarks_run(tmp_path):
    import importlib.util

    jobs_out, lerobot_out = tmp_path / "jobs.json", tmp_path / "lerobot.json"
    runs = [(["bench_jobs.py", "--tasks", "4", "--jobs", "3", "--repeats", "1"], jobs_out)]
    if importlib.util.find_spec("lerobot") is not None:
        runs.append((["bench_lerobot.py", "--clients", "1,2", "--duration", "0.5"], lerobot_out))
    for args, out in runs:
        result = subprocess.run([sys.executable, str(ROOT / "bench" / args[0]), *args[1:], "--out", str(out)],
                                capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
    assert {"memory", "sqlite"} <= set(json.loads(jobs_out.read_text())["stores"])
    if len(runs) == 2:
        assert json.loads(lerobot_out.read_text())["throughput"]["2"]["batched"]["requests_per_s"] > 0


@pytest.mark.slow
def test_reload_benchmark_runs(tmp_path):
    out = tmp_path / "reload.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_reload.py"), "--models", "cartpole,large_mlp",
                             "--large-width", "128", "--clients", "2", "--before-s", "0.3", "--after-s", "0.3",
                             "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    models = json.loads(out.read_text())["models"]
    assert set(models) == {"cartpole", "large_mlp"}
    assert all(m["failed_requests"] == 0 and m["served_new_after"] and len(m["versions_seen"]) == 2
               for m in models.values())


@pytest.mark.slow
def test_commits_benchmark_runs(tmp_path):
    import os

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("bench_commits pins the server and the load to two CPUs")
    out = tmp_path / "commits.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_commits.py"), "--base", "HEAD", "--head", "HEAD",
                             "--rounds", "1", "--clients", "1,2", "--duration", "0.3", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    assert set(summary) == {"base", "head"} and all(summary[k]["2"]["requests_per_s"] > 0 for k in summary)


@pytest.mark.slow
def test_selfplay_actors_benchmark_runs(tmp_path):
    out = tmp_path / "actors.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_selfplay_actors.py"), "--rounds", "1",
                             "--iterations", "1", "--games", "3", "--simulations", "4", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert set(figures["summary"]) == {"1", "2"} and figures["summary"]["1"]["vs_first"] == 1.0
    assert all(run["games"] == 3 and run["games_per_s"] > 0 for runs in figures["runs"].values() for run in runs)
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_selfplay_actors.py"), "--actors", "1,x"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and "--actors: expected comma-separated integers" in bad.stderr
