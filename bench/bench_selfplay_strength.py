"""Self-play strength against exact solutions: how often each player picks an optimal-outcome move.

    python bench/bench_selfplay_strength.py [--positions 400] [--games dots_boxes,connect4] [--reference benchmark]

On the fixed reference sets (bench/reference/selfplay_reference_<game>.json, made
by bench/selfplay_reference.py: Dots and Boxes 3x3 with 8-14 lines left,
solved by our own exhaustive solver; Connect Four after 8-20 random plies,
solved by BitBully; only positions whose moves' outcomes differ), each player
picks one move per position. ``--reference validation`` measures on the
disjoint validation sets instead (selfplay_reference_<game>_validation.json),
for choosing among checkpoints or search settings without tuning to the
benchmark positions.

- ``network``: the shipped network's highest prior (served by gpu_worker);
- ``mcts+net@S``: the project's MCTS with that network, S simulations;
- ``mcts+uniform@S``: the same MCTS with uniform priors and value 0;

each MCTS player once per ``--search`` setting (see SEARCHES: textbook PUCT,
first-play urgency, MCTS-Solver, decisive moves, Gumbel root and completed Q).

``optimal`` is the share of positions where the move's exact outcome is the
best available; ``tactical`` the share among positions where a move wins at
once or an immediate loss must be blocked. Every network evaluation goes
through a model server process and the client pool, as in production. Prints
a table and writes JSON (with the failures, for study).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchlib import write_results  # noqa: E402
from bench.selfplay_reference import load, mcts_choices, network_choices, score_choices  # noqa: E402
from gpu_worker.config import ModelConfig, ServerConfig  # noqa: E402
from gpu_worker.launch import start_server_process  # noqa: E402
from pi0_reward_server.client_pool import ClientPool  # noqa: E402
from pi0_reward_server.policies import PoolPolicy  # noqa: E402
from pi0_reward_server.kinds.selfplay.mcts import MCTSConfig, UniformEvaluator  # noqa: E402
from pi0_reward_server.kinds.selfplay.play import PolicyEvaluator  # noqa: E402

# Named search settings, each one step from textbook PUCT, so every improvement is measured on its own.
SEARCHES = {
    "puct": dict(selection="puct", solver=False, decisive=False, fpu_reduction=None),
    "puct+fpu": dict(selection="puct", solver=False, decisive=False, fpu_reduction=0.2),
    "puct+solver": dict(selection="puct", solver=True, decisive=False, fpu_reduction=None),
    "puct+solver+decisive": dict(selection="puct", solver=True, decisive=True, fpu_reduction=None),
    "puct+fpu+solver+decisive": dict(selection="puct", solver=True, decisive=True, fpu_reduction=0.2),
    "gumbel": dict(selection="gumbel", solver=False, decisive=False),
    "gumbel+solver": dict(selection="gumbel", solver=True, decisive=False),
    "gumbel+solver+decisive": dict(selection="gumbel", solver=True, decisive=True),
    "default": {},  # MCTSConfig's defaults: what the product runs
}

NETS = {"connect4": ("connect4", "Connect4Net", "connect4_6x7.pt"),
        "dots_boxes": ("dots_boxes_3x3", "DotsBoxes3x3Net", "dots_boxes_3x3.pt")}


def parse_players(text: str) -> list[tuple[str, str, int]]:
    """'network,net@64,net@400,uniform@400' -> [(label, kind, simulations)]."""
    players = []
    for item in text.split(","):
        kind, _, sims = item.strip().partition("@")
        if kind not in ("network", "net", "uniform") or (kind != "network") != bool(sims):
            raise SystemExit(f"--players: expected network, net@S or uniform@S, got {item!r}")
        if kind == "network":
            players.append(("network", "network", 0))
        else:
            players.append((f"mcts+{'net' if kind == 'net' else 'uniform'}@{sims}", kind, int(sims)))
    return players


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--games", default="dots_boxes,connect4")
    parser.add_argument("--players", default="network,net@64,net@400,uniform@400")
    parser.add_argument("--positions", type=int, default=400, help="the first N positions of each set")
    parser.add_argument("--leaves-per-round", type=int, default=8)
    parser.add_argument("--search", default="default", help=f"comma-separated, of: {', '.join(SEARCHES)}")
    parser.add_argument("--checkpoint-dir", default=None, help="default: gpu_worker/checkpoints")
    parser.add_argument("--reference", default="benchmark", metavar="NAME",
                        help="which reference set: benchmark (default) or another made by bench/selfplay_reference.py "
                             "--set NAME (e.g. validation)")
    parser.add_argument("--label", default="", help="a note stored with the figures (e.g. which search)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    players = parse_players(args.players)
    searches = [x.strip() for x in args.search.split(",")]
    for name in searches:
        if name not in SEARCHES:
            raise SystemExit(f"--search: unknown {name!r}; known: {', '.join(SEARCHES)}")
    games = [g.strip() for g in args.games.split(",")]
    for g in games:
        if g not in NETS:
            raise SystemExit(f"--games: unknown game {g!r}; known: {sorted(NETS)}")
    try:  # before the model server starts
        sets = {g: load(g, args.reference) for g in games}
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--reference: {e}") from None
    ckpt_dir = pathlib.Path(args.checkpoint_dir or ROOT / "gpu_worker" / "checkpoints")
    models = tuple(ModelConfig(name=NETS[g][0], target=f"gpu_worker.models.selfplay_net:{NETS[g][1]}",
                               checkpoint=str(ckpt_dir / NETS[g][2])) for g in games)
    results: dict = {"cpu_cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "label": args.label,
                     "reference": args.reference,
                     "leaves_per_round": args.leaves_per_round, "checkpoints": str(ckpt_dir.relative_to(ROOT))
                     if ckpt_dir.is_relative_to(ROOT) else ckpt_dir.name, "games": {}}
    server = start_server_process(ServerConfig(port=0, models=models, log_level="WARNING", max_queue=65536))
    try:
        with ClientPool([server.url], connections_per_server=1).start(wait_s=60) as pool:
            for name in games:
                game, positions = sets[name]
                positions = positions[: args.positions]
                network = PolicyEvaluator(PoolPolicy(pool, NETS[name][0]))
                rows = results["games"][name] = {}
                runs = [(label, kind, sims, search) for label, kind, sims in players
                        for search in (searches if kind != "network" else [None])]
                for label, kind, sims, search in runs:
                    key = label if search is None else f"{label} [{search}]"
                    started = time.perf_counter()
                    if kind == "network":
                        choices = network_choices(game, positions, network)
                    else:
                        config = MCTSConfig(simulations=sims, leaves_per_round=args.leaves_per_round, **SEARCHES[search])
                        choices = mcts_choices(game, positions, network if kind == "net" else UniformEvaluator(), config)
                    rows[key] = {**score_choices(positions, choices), "seconds": time.perf_counter() - started}
                    r = rows[key]
                    print(f"{name:11s} {key:44s} optimal {r['optimal']:6.1%}   tactical {r['tactical']:6.1%} "
                          f"({r['tactical_positions']})   {r['seconds']:6.1f}s", flush=True)
    finally:
        server.stop()

    print(f"\nOptimal-outcome moves on exact reference positions ({args.reference} set, {args.positions} per game)"
          f"{' - ' + args.label if args.label else ''}\n")
    print(f"  {'game':11s} {'player [search]':44s} {'optimal':>8s} {'tactical':>9s}")
    for name, rows in results["games"].items():
        for label, r in rows.items():
            print(f"  {name:11s} {label:44s} {r['optimal']:8.1%} {r['tactical']:9.1%}")
    write_results(args.out or ROOT / "bench" / "results" / "selfplay_strength_cpu.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
