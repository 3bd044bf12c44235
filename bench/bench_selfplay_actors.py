"""Self-play training speed against the number of actor processes, side by side in one run.

    python bench/bench_selfplay_actors.py [--actors 1,2] [--rounds 2] [--device cpu]

Runs ``scripts/train_selfplay.py`` (Connect Four, from the shipped network, games starting after 0-20
random plies, mixed value target) for ``--iterations`` iterations of ``--games`` games at
``--simulations`` simulations with each ``--actors`` setting; the settings alternate round by round,
so drift on a shared machine falls on all of them. Reports the training loop's games per second
(self-play and the training steps, from the script's own figures; the final evaluation matches are
kept tiny and not counted). Prints a table and writes JSON
(``bench/results/selfplay_actors_<device>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from benchlib import write_results  # noqa: E402


def run(actors: int, args, work: pathlib.Path) -> dict:
    summary = work / f"actors{actors}.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "train_selfplay.py"), "--game", "connect4",
                    "--iterations", str(args.iterations), "--games", str(args.games),
                    "--simulations", str(args.simulations), "--actors", str(actors), "--random-plies", "20",
                    "--value-target", "mixed", "--device", args.device, "--eval-games", "2",
                    "--eval-simulations", "4", "--out", str(work / "net.pt"), "--results", str(summary)],
                   check=True, cwd=ROOT, capture_output=True, timeout=3600)
    figures = json.loads(summary.read_text())
    return {"games": figures["games"], "train_seconds": figures["train_seconds"],
            "games_per_s": figures["games"] / figures["train_seconds"], "server_threads": figures["server_threads"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", default="1,2", help="comma-separated actor counts")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--games", type=int, default=128)
    parser.add_argument("--simulations", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    try:
        settings = [int(a) for a in args.actors.split(",")]
    except ValueError:
        parser.error(f"--actors: expected comma-separated integers, got {args.actors!r}")
    if not settings or min(settings) < 1 or args.rounds < 1:
        parser.error("--actors must all be at least 1, and --rounds at least 1")
    runs: dict[str, list[dict]] = {str(a): [] for a in settings}
    with tempfile.TemporaryDirectory(prefix="selfplay-actors-") as tmp:
        for round_ in range(args.rounds):
            for actors in settings:
                runs[str(actors)].append(run(actors, args, pathlib.Path(tmp)))
                r = runs[str(actors)][-1]
                print(f"round {round_}  actors {actors:2d}  {r['games']} games in {r['train_seconds']:6.1f}s  "
                      f"{r['games_per_s']:5.2f} games/s", flush=True)
    base = statistics.median(r["games_per_s"] for r in runs[str(settings[0])])
    table = {a: {"games_per_s_median": statistics.median(r["games_per_s"] for r in rs),
                 "vs_first": statistics.median(r["games_per_s"] for r in rs) / base} for a, rs in runs.items()}
    print(f"\nConnect Four self-play training, {args.games} games x {args.iterations} iterations at "
          f"{args.simulations} simulations, {args.device}, {os.cpu_count()} cores\n")
    print(f"  {'actors':>6s} {'games/s':>8s} {'vs ' + str(settings[0]):>8s}")
    for a, t in table.items():
        print(f"  {a:>6s} {t['games_per_s_median']:8.2f} {t['vs_first']:7.2f}x")
    write_results(args.out or ROOT / "bench" / "results" / f"selfplay_actors_{args.device}.json",
                  {"date": time.strftime("%Y-%m-%d"), "device": args.device, "cpu_cores": os.cpu_count(),
                   "games": args.games, "iterations": args.iterations, "simulations": args.simulations,
                   "rounds": args.rounds, "summary": table, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
