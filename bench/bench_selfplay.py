"""MCTS simulations per second: one leaf per network call vs leaves batched across games.

    python bench/bench_selfplay.py [--device cpu|cuda] [--simulations 64]

Same network (the shipped Connect Four policy-value net), same model server
(gpu_worker in its own process), same client pool:

(a) naive: one game at a time, one leaf per network call (batch = 1), as a
    per-process AlphaZero loop does;
(b) batched: G = 1, 16, 64, 256 games searched together, 8 leaves per tree
    per round with virtual loss, each round one explicit batch frame.

Positions are Connect Four openings (a few seeded random moves in). Prints a
table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchlib import write_results  # noqa: E402
from gpu_worker.config import ModelConfig, ServerConfig  # noqa: E402
from gpu_worker.launch import start_server_process  # noqa: E402
from pi0_reward_server.client_pool import ClientPool  # noqa: E402
from pi0_reward_server.policies import PoolPolicy  # noqa: E402
from pi0_reward_server.kinds.selfplay.games import make_game  # noqa: E402
from pi0_reward_server.kinds.selfplay.mcts import MCTSConfig, search  # noqa: E402
from pi0_reward_server.kinds.selfplay.play import PolicyEvaluator  # noqa: E402


def openings(game, n: int, rng) -> list:
    states = []
    for _ in range(n):
        state = game.initial_state()
        for _ in range(int(rng.integers(0, 6))):
            state = game.next_state(state, int(rng.choice(np.flatnonzero(game.legal_mask(state)))))
        states.append(state)
    return states


def measure(game, states, evaluator, config, min_seconds: float) -> dict:
    rng = np.random.default_rng(0)
    sims = searches = 0
    calls0, rows0 = evaluator.calls, evaluator.rows
    started = time.perf_counter()
    while True:
        visits = search(game, states, evaluator, config, rng, add_noise=False)
        sims += int(sum(v.sum() for v in visits))
        searches += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            break
    calls = evaluator.calls - calls0
    return {"simulations_per_s": sims / elapsed, "network_calls": calls,
            "mean_batch_rows": (evaluator.rows - rows0) / max(1, calls), "searches": searches, "seconds": elapsed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--simulations", type=int, default=64)
    parser.add_argument("--games", default="1,16,64,256")
    parser.add_argument("--leaves-per-round", type=int, default=8)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--checkpoint", default=None, help="default: the shipped connect4 checkpoint")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    game = make_game("connect4")
    model = ModelConfig(name="connect4", target="gpu_worker.models.selfplay_net:Connect4Net", checkpoint=args.checkpoint)
    server = start_server_process(ServerConfig(port=0, device=args.device, models=(model,), log_level="WARNING"))
    rng = np.random.default_rng(0)
    results: dict = {"device": args.device, "cpu_cores": os.cpu_count(), "simulations": args.simulations,
                     "date": time.strftime("%Y-%m-%d"), "network": "Connect4Net (3x256 MLP)"}
    try:
        with ClientPool([server.url], connections_per_server=1).start(wait_s=30) as pool:
            pool.infer_batch([{"observation/board": np.zeros(84, np.float32)}])  # warm up
            evaluator = PolicyEvaluator(PoolPolicy(pool, "connect4"))
            naive = measure(game, openings(game, 1, rng), evaluator,
                            MCTSConfig(simulations=args.simulations, leaves_per_round=1), args.min_seconds)
            results["naive"] = naive
            results["batched"] = {}
            for g in [int(x) for x in args.games.split(",")]:
                point = measure(game, openings(game, g, rng), evaluator,
                                MCTSConfig(simulations=args.simulations, leaves_per_round=args.leaves_per_round),
                                args.min_seconds)
                point["speedup_vs_naive"] = point["simulations_per_s"] / naive["simulations_per_s"]
                results["batched"][str(g)] = point
    finally:
        server.stop()

    print(f"\nMCTS simulations/s, Connect Four, {args.simulations} simulations per move, model server on {args.device}\n")
    print(f"  naive (1 game, 1 leaf per call)        {results['naive']['simulations_per_s']:9.0f} sims/s   "
          f"batch {results['naive']['mean_batch_rows']:.1f}")
    for g, p in results["batched"].items():
        print(f"  batched, G = {g:>3} games, {args.leaves_per_round} leaves/tree  {p['simulations_per_s']:9.0f} sims/s   "
              f"batch {p['mean_batch_rows']:6.1f}   {p['speedup_vs_naive']:5.1f}x")
    write_results(args.out or ROOT / "bench" / "results" / f"selfplay_{args.device.split(':')[0]}.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
