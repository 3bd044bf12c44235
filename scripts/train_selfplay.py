"""Train a shipped self-play network (AlphaZero loop) with its games generated through a model server.

    python scripts/train_selfplay.py --game connect4        # writes gpu_worker/checkpoints/connect4_6x7.pt
    python scripts/train_selfplay.py --game dots_boxes      # writes gpu_worker/checkpoints/dots_boxes_3x3.pt

Each iteration starts a gpu_worker hosting the current weights (spawned, so
this process's torch never touches the server's), plays ``--games`` self-play
games at once with batched MCTS through the client pool (Dirichlet noise at
the root, visit-count temperature for the opening moves), trains the network
on the last ``--window`` iterations' positions (cross-entropy to the visit
distribution plus squared error to the final outcome, as in AlphaZero), and
saves the weights. At the end the network plays MCTS with a uniform
evaluator at equal simulations and the win rate is written to
``bench/results/selfplay_training_<game>.json``. Seeded; a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gpu_worker.config import ModelConfig, ServerConfig  # noqa: E402
from gpu_worker.launch import start_server_process  # noqa: E402
from gpu_worker.models.selfplay_net import Connect4Net, DotsBoxes3x3Net  # noqa: E402
from pi0_reward_server.client_pool import ClientPool  # noqa: E402
from pi0_reward_server.policies import PoolPolicy  # noqa: E402
from pi0_reward_server.kinds.selfplay.games import ConnectFour, make_game  # noqa: E402
from pi0_reward_server.kinds.selfplay.mcts import MCTSConfig, UniformEvaluator  # noqa: E402
from pi0_reward_server.kinds.selfplay.play import Agent, PolicyEvaluator, match_score, play_games  # noqa: E402

NETS = {"connect4": (Connect4Net, "connect4_6x7.pt"), "dots_boxes": (DotsBoxes3x3Net, "dots_boxes_3x3.pt")}


def mirror_connect4(game: ConnectFour, states: np.ndarray, policies: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connect Four is symmetric left-right: twice the data for free."""
    boards = states.reshape(-1, 2, game.rows, game.cols)[..., ::-1]
    return boards.reshape(len(states), -1).copy(), policies[:, ::-1].copy()


def serve(net_cls, checkpoint: pathlib.Path, name: str):
    target = f"{net_cls.__module__}:{net_cls.__name__}"
    config = ServerConfig(port=0, log_level="WARNING", models=(ModelConfig(name=name, target=target, checkpoint=str(checkpoint)),))
    server = start_server_process(config)
    pool = ClientPool([server.url], connections_per_server=1).start(wait_s=10)
    return server, pool


def train_step(net, optimizer, states, policies, values, *, epochs: int, batch: int, rng) -> float:
    net.train()
    losses = []
    for _ in range(epochs):
        order = rng.permutation(len(states))
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            x = torch.from_numpy(states[idx])
            out = net({"observation/board": x})
            policy_loss = -(torch.from_numpy(policies[idx]) * torch.log_softmax(out["policy_logits"], -1)).sum(-1).mean()
            value_loss = ((out["value"] - torch.from_numpy(values[idx])) ** 2).mean()
            loss = policy_loss + value_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    net.eval()
    return float(np.mean(losses))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--game", choices=sorted(NETS), required=True)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--games", type=int, default=64, help="self-play games per iteration, all in flight at once")
    parser.add_argument("--simulations", type=int, default=48)
    parser.add_argument("--temperature-moves", type=int, default=8)
    parser.add_argument("--window", type=int, default=4, help="iterations of positions kept for training")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--eval-games", type=int, default=64)
    parser.add_argument("--eval-simulations", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="checkpoint path (default: the shipped one)")
    parser.add_argument("--results", default=None, help="JSON summary (default: bench/results/selfplay_training_<game>.json)")
    args = parser.parse_args()

    net_cls, filename = NETS[args.game]
    out = pathlib.Path(args.out or ROOT / "gpu_worker" / "checkpoints" / filename)
    game = make_game(args.game)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    net = net_cls()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
    work = pathlib.Path(tempfile.mkdtemp(prefix="selfplay-"))
    checkpoint = work / "current.pt"
    torch.save(net.state_dict(), checkpoint)
    config = MCTSConfig(simulations=args.simulations, leaves_per_round=8)
    buffer: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    started = time.monotonic()
    history = []
    for iteration in range(args.iterations):
        server, pool = serve(net_cls, checkpoint, args.game)
        try:
            agent = Agent("mcts", PolicyEvaluator(PoolPolicy(pool, args.game)), config, noise=True)
            results = play_games(game, [(agent, agent)] * args.games, rng, temperature_moves=args.temperature_moves,
                                 record=True)
        finally:
            pool.close()
            server.stop()
        states = np.stack([s for r in results for s in r.states])
        policies = np.stack([p for r in results for p in r.policies])
        values = np.array([(r.outcome if player == 0 else -r.outcome) for r in results for player in r.players],
                          dtype=np.float32)
        if isinstance(game, ConnectFour):
            mirrored = mirror_connect4(game, states, policies)
            states, policies, values = (np.concatenate([states, mirrored[0]]), np.concatenate([policies, mirrored[1]]),
                                        np.concatenate([values, values]))
        buffer = (buffer + [(states, policies, values)])[-args.window :]
        data = [np.concatenate(parts) for parts in zip(*buffer)]
        loss = train_step(net, optimizer, *data, epochs=args.epochs, batch=256, rng=rng)
        torch.save(net.state_dict(), checkpoint)
        outcomes = [r.outcome for r in results]
        history.append({"iteration": iteration, "positions": len(data[0]), "loss": loss,
                        "first_player_wins": sum(o > 0 for o in outcomes), "draws": sum(o == 0 for o in outcomes)})
        print(f"iter {iteration:2d}  positions {len(data[0]):6d}  loss {loss:.3f}  "
              f"p0 wins {history[-1]['first_player_wins']:3d}/{args.games}  {time.monotonic() - started:6.1f}s", flush=True)
    train_seconds = time.monotonic() - started

    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out)
    # Evaluate through a model server hosting the final weights: network MCTS vs uniform MCTS, equal simulations.
    server, pool = serve(net_cls, out, args.game)
    try:
        eval_config = MCTSConfig(simulations=args.eval_simulations, leaves_per_round=8)
        ours = Agent("mcts", PolicyEvaluator(PoolPolicy(pool, args.game)), eval_config)
        baseline = Agent("mcts", UniformEvaluator(), eval_config)
        seats = [(ours, baseline) if g % 2 == 0 else (baseline, ours) for g in range(args.eval_games)]
        results = play_games(game, seats, np.random.default_rng(12345), temperature_moves=2)
        score = match_score(results, [g % 2 for g in range(args.eval_games)])
    finally:
        pool.close()
        server.stop()
    summary = {"game": game.name, "checkpoint": out.name, "train_seconds": round(train_seconds, 1),
               "iterations": args.iterations, "games_per_iteration": args.games, "simulations": args.simulations,
               "eval": {"opponent": "MCTS, uniform evaluator", "simulations": args.eval_simulations,
                        "games": args.eval_games, **score}, "history": history}
    result_path = pathlib.Path(args.results or ROOT / "bench" / "results" / f"selfplay_training_{args.game}.json")
    result_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes) after {train_seconds:.0f}s of training")
    print(f"vs uniform MCTS at {args.eval_simulations} simulations: score {score['score']:.3f} "
          f"({score['wins']}W {score['draws']}D {score['losses']}L)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
