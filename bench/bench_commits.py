"""The model server's throughput at two commits, side by side: a change's effect, measured in one run.

    python bench/bench_commits.py --base a918b9b~1 [--head HEAD] [--rounds 2]

Each commit is checked out into a temporary git worktree; its gpu_worker serves a ComputeMLP on CPU 0 (one
OpenMP thread) while this process drives 1, 4 and 64 lock-step clients from CPU 1, the commits alternating
round by round so that drift on a shared machine falls on both. Prints a table, writes JSON (and a plot).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys
root, width, depth, clients, duration = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
sys.path[:0] = [root, os.path.join(root, "bench")]
import bench_gpu_worker as b
from gpu_worker.config import ModelConfig, ServerConfig
from gpu_worker.launch import start_server_process

def main():
    model = ModelConfig(name="compute", target="gpu_worker.models.compute_mlp:ComputeMLP",
                        options={"width": width, "depth": depth})
    server = start_server_process(ServerConfig(port=0, models=(model,), log_level="WARNING", device="cpu"),
                                  env={"OMP_NUM_THREADS": "1"})
    os.sched_setaffinity(server.process.pid, {0})
    os.sched_setaffinity(0, {1})
    try:
        out = {c: b.load(server.url, b.compute_obs(), int(c), duration) for c in clients.split(",")}
    finally:
        server.stop()
    print(json.dumps(out))

if __name__ == "__main__":
    main()
"""


def rev(name: str) -> str:
    return subprocess.run(["git", "rev-parse", "--short", name], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--head", default="HEAD")
    parser.add_argument("--base-tree", default=None,
                        help="a copy of --base's files to use instead of a git worktree (where git history is absent)")
    parser.add_argument("--head-tree", default=None, help="likewise for --head")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", default="1,4,64")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "commits_cpu.json"))
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs 2 CPUs: the server pinned to one, the load to another")
    given = {"base": args.base_tree, "head": args.head_tree}
    commits = {label: name if given[label] else rev(name) for label, name in (("base", args.base), ("head", args.head))}
    folder = pathlib.Path(tempfile.mkdtemp(prefix="bench-commits-"))
    script = folder / "child.py"
    script.write_text(CHILD)
    trees: dict[str, pathlib.Path] = {}
    made: list[pathlib.Path] = []
    try:
        for label, commit in commits.items():
            if given[label]:
                trees[label] = pathlib.Path(given[label]).resolve()
                continue
            trees[label] = folder / label
            subprocess.run(["git", "worktree", "add", "--detach", "-q", str(trees[label]), commit], cwd=ROOT,
                           check=True)
            made.append(trees[label])
        runs: dict[str, list] = {label: [] for label in commits}
        for _ in range(args.rounds):
            for label in commits:
                done = subprocess.run([sys.executable, str(script), str(trees[label]), str(args.width),
                                       str(args.depth), args.clients, str(args.duration)],
                                      cwd=trees[label], check=True, capture_output=True, text=True)
                runs[label].append(json.loads(done.stdout.strip().splitlines()[-1]))
    finally:
        for tree in made:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    levels = args.clients.split(",")
    summary = {label: {c: {"requests_per_s": sum(r[c]["requests_per_s"] for r in runs[label]) / len(runs[label]),
                           "p50_ms": sum(r[c]["p50_ms"] for r in runs[label]) / len(runs[label])}
                       for c in levels} for label in commits}
    print(f"\ngpu_worker, ComputeMLP {args.width} x {args.depth}, server on CPU 0, load on CPU 1, "
          f"mean of {args.rounds} alternating rounds (requests/s, p50 ms)")
    print(f"  clients | base {commits['base']:>10} | head {commits['head']:>10} | head/base")
    for c in levels:
        b, h = summary["base"][c], summary["head"][c]
        print(f"  {c:>7} | {b['requests_per_s']:>8.0f} {b['p50_ms']:5.2f} | {h['requests_per_s']:>8.0f} "
              f"{h['p50_ms']:5.2f} | {h['requests_per_s'] / b['requests_per_s']:.2f}x")
    sys.path.insert(0, str(ROOT))
    from bench.benchlib import write_results

    write_results(args.out, {"commits": commits, "model": {"width": args.width, "depth": args.depth},
                             "rounds": args.rounds, "duration_s": args.duration, "pinned": True,
                             "summary": summary, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
