"""Score tasks against a running reward app and print a table of results.

    python example_client.py                                  # one task: cartpole
    python example_client.py --tasks cartpole cartpole_short gym:CartPole-v1 --repeat 4
    python example_client.py --url http://<public-host>:<mapped-port> --token "$REWARD_SERVER_TOKEN"
    python example_client.py --job --tasks libero:libero_spatial:0 --episodes 50   # a long evaluation as a job

Tasks are sent ``--per-request`` at a time in ``POST /score`` requests, up to
``--concurrency`` requests at once; the progress bar counts scored tasks.
With ``--job`` all tasks go in one job (``POST /jobs``), and the progress bar
follows its server-sent events (``GET /jobs/<id>/events``) episode by episode;
Ctrl-C cancels the job. Behind a port mapping (AutoDL maps the box's port
6006 to a public address), pass that public address as ``--url``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from tqdm import tqdm


def call(url: str, path: str, body: dict | None, token: str | None, timeout: float) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url.rstrip("/") + path, data=data, headers=headers, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, {"error": exc.reason}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:6006", help="the reward app (a public address works too)")
    parser.add_argument("--token", help="bearer token, when the app has REWARD_SERVER_TOKEN set")
    parser.add_argument("--tasks", nargs="+", default=["cartpole"],
                        help="task names, gym:<EnvId>, libero:<suite>:<task_id>, or a JSON object for a full spec")
    parser.add_argument("--repeat", type=int, default=1, help="send each task this many times")
    parser.add_argument("--episodes", type=int, default=None, help="episodes per task (default: the app's)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-workers", type=int, default=None, help="fan-out inside one /score request")
    parser.add_argument("--per-request", type=int, default=1, help="tasks per /score request")
    parser.add_argument("--concurrency", type=int, default=4, help="/score requests in flight at once")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--job", action="store_true", help="submit one job and follow its event stream")
    args = parser.parse_args(argv)
    for name in ("repeat", "per_request", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")

    status, health = call(args.url, "/health", None, None, 10)
    if status != 200:
        print(f"reward app at {args.url} is not healthy ({status}): {health}", file=sys.stderr)
        return 1
    kwargs = {k: v for k, v in (("episodes", args.episodes), ("seed", args.seed), ("max_workers", args.max_workers)) if v is not None}
    try:
        specs = [json.loads(t) if t.lstrip().startswith("{") else t for t in args.tasks]
    except json.JSONDecodeError as exc:
        parser.error(f"--tasks: a task starting with '{{' must be a JSON object: {exc}")
    tasks = [t for t in specs for _ in range(args.repeat)]
    if args.job:
        return run_job(args, tasks, kwargs)
    chunks = [list(range(i, min(i + args.per_request, len(tasks)))) for i in range(0, len(tasks), args.per_request)]
    results: list[dict | None] = [None] * len(tasks)
    started = time.monotonic()

    def score(indices: list[int]) -> tuple[list[int], int, Any]:
        body = {"responses": [tasks[i] for i in indices], "reward_function_kwargs": kwargs}
        return (indices, *call(args.url, "/score", body, args.token, args.timeout))

    errors = 0
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as executor, tqdm(total=len(tasks), unit="task") as bar:
        for indices, status, body in executor.map(score, chunks):
            if status == 401:
                bar.close()
                print("401 unauthorized: pass --token (the app's REWARD_SERVER_TOKEN)", file=sys.stderr)
                return 1
            for j, i in enumerate(indices):
                if status == 200:
                    results[i] = body["details"][j]
                else:
                    results[i] = {"score": None, "error": f"HTTP {status}: {body.get('error')}"}
                    errors += 1
            bar.update(len(indices))

    return print_results(tasks, results, started, errors)


def print_results(tasks: list, results: list, started: float, errors: int) -> int:
    print(f"\n{'#':>3}  {'task':<18} {'score':>6} {'episodes':>8} {'succ':>5} {'mean return':>11} {'sec':>6}  server / error")
    for i, (task, r) in enumerate(zip(tasks, results)):
        score_text = "-" if r.get("score") is None else f"{r['score']:.3f}"
        mean = "-" if r.get("mean_return") is None else f"{r['mean_return']:.1f}"
        succ = "-" if r.get("successes") is None else str(r["successes"])
        where = r.get("error") or ",".join(s.rsplit(":", 1)[-1] for s in r.get("servers", []))
        label = task if isinstance(task, str) else str(task.get("task") or task.get("kind") or "spec")
        print(f"{i:>3}  {label:<18} {score_text:>6} {r.get('episodes', 0) or 0:>8} {succ:>5} {mean:>11} "
              f"{r.get('seconds', 0) or 0:>6.2f}  {where}")
    scores = [r["score"] for r in results if r and r.get("score") is not None]
    if scores:
        print(f"\n{len(scores)} task(s) scored in {time.monotonic() - started:.1f}s, mean score {sum(scores) / len(scores):.3f}")
    return 1 if errors else 0


def follow(url: str, token: str | None, timeout: float):
    """Yield (event, data) from a server-sent event stream."""
    headers = {"Accept": "text/event-stream", **({"Authorization": f"Bearer {token}"} if token else {})}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as stream:
        name, data = None, []
        for raw in stream:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif not line and name:
                yield name, json.loads("\n".join(data))
                name, data = None, []


def run_job(args, tasks: list, kwargs: dict) -> int:
    started = time.monotonic()
    status, body = call(args.url, "/jobs", {"responses": tasks, "reward_function_kwargs": kwargs}, args.token, 60)
    if status != 202:
        print(f"job refused ({status}): {body.get('error')}", file=sys.stderr)
        return 1
    job_id = body["id"]
    print(f"job {job_id}: {args.url.rstrip('/')}/jobs/{job_id}")
    final = None
    try:
        with tqdm(unit="episode") as bar:
            for name, data in follow(f"{args.url.rstrip('/')}/jobs/{job_id}/events", args.token, args.timeout):
                bar.total = data["units"]["total"]
                bar.n = data["units"]["done"]
                bar.set_postfix(state=data["state"], tasks=f"{data['tasks']['done']}/{data['tasks']['total']}")
                bar.refresh()
                if name == "result":
                    final = data
    except KeyboardInterrupt:
        request = urllib.request.Request(f"{args.url.rstrip('/')}/jobs/{job_id}", method="DELETE",
                                         headers={"Authorization": f"Bearer {args.token}"} if args.token else {})
        urllib.request.urlopen(request, timeout=30).close()
        print(f"\ncancelled job {job_id}", file=sys.stderr)
        return 130
    if final is None or final.get("result") is None:
        print(f"job {job_id} ended without a result: {final and final.get('error')}", file=sys.stderr)
        return 1
    details = final["result"]["details"]
    return print_results(tasks, details, started, sum(d.get("error") is not None for d in details))


if __name__ == "__main__":
    sys.exit(main())
