"""Train a shipped self-play network (AlphaZero loop) with its games generated through a model server.

    python scripts/train_selfplay.py --game connect4        # writes gpu_worker/checkpoints/connect4_6x7.pt
    python scripts/train_selfplay.py --game dots_boxes      # writes gpu_worker/checkpoints/dots_boxes_3x3.pt

Each iteration starts a gpu_worker hosting the current weights (spawned, so
this process's torch never touches the server's), plays ``--games`` self-play
games at once with batched MCTS through the client pool (the product's search:
PUCT with Dirichlet root noise by default, Gumbel root noise with
``--selection gumbel``; the search's policy for the opening moves), trains
the network on the last ``--window`` iterations' positions (cross-entropy to the search's policy, the
improved policy with Gumbel, plus squared error to the final outcome, as in
AlphaZero, or with ``--value-target mixed`` to the mean of the outcome and the
search's root value), and saves the weights. ``--init`` continues from a checkpoint
(default: the shipped one), ``--minutes`` caps the wall time. ``--actors N`` plays
each iteration's games in N spawned processes that share the one model server
(which batches all their leaves into its forward passes): the MCTS is Python
and takes a core per actor, so on a many-core GPU box this is what makes the
GPU worth having; the server's torch gets the cores the actors leave
(``--server-threads``). Even on two cores ``--actors 2`` trains 1.29x the
games per second of one process (``bench/bench_selfplay_actors.py``). The
weights are written after every iteration, and
``--snapshot-every`` keeps intermediate ones for choosing among them.

At the end the new network plays the starting one (``--init``) and MCTS
with a uniform evaluator, both at equal simulations through a model server,
and the training figures (games, simulations, positions, wall time, device,
scores) are written to ``bench/results/selfplay_training_<game>.json``.
Seeded; the strength against exact solutions is measured by
``bench/bench_selfplay_strength.py --checkpoint-dir``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
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
from pi0_reward_server.kinds.selfplay.mcts import SELECTIONS, MCTSConfig, UniformEvaluator  # noqa: E402
from pi0_reward_server.kinds.selfplay.play import Agent, PolicyEvaluator, match_score, play_games  # noqa: E402

NETS = {"connect4": (Connect4Net, "connect4_6x7.pt"), "dots_boxes": (DotsBoxes3x3Net, "dots_boxes_3x3.pt")}
VALUE_TARGETS = ("outcome", "mixed")


def value_targets(results, kind: str) -> np.ndarray:
    """Each recorded position's value target, from its mover's view: the game's outcome, or (``mixed``) the
    outcome and the search's value of the position averaged."""
    outcome = np.array([(r.outcome if player == 0 else -r.outcome) for r in results for player in r.players],
                       dtype=np.float32)
    if kind == "outcome":
        return outcome
    searched = np.array([v for r in results for v in r.values], dtype=np.float32)
    return (outcome + searched) / 2


def mirror_connect4(game: ConnectFour, states: np.ndarray, policies: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connect Four is symmetric left-right: twice the data for free."""
    boards = states.reshape(-1, 2, game.rows, game.cols)[..., ::-1]
    return boards.reshape(len(states), -1).copy(), policies[:, ::-1].copy()


def serve(net_cls, checkpoints: dict[str, pathlib.Path], device: str, threads: int):
    """One model server process hosting each named checkpoint of ``net_cls``, its torch on ``threads`` threads."""
    target = f"{net_cls.__module__}:{net_cls.__name__}"
    models = tuple(ModelConfig(name=name, target=target, checkpoint=str(path)) for name, path in checkpoints.items())
    config = ServerConfig(port=0, device=device, log_level="WARNING", max_queue=65536, models=models)
    return start_server_process(config, env={"OMP_NUM_THREADS": str(threads)})


def server_threads(requested: int | None, actors: int) -> int:
    """The model server's torch threads: as asked, else the cores the actors leave (at least one). A server whose
    OpenMP threads outnumber the free cores stalls at its barriers while the searches hold those cores."""
    return requested if requested is not None else max(1, (os.cpu_count() or 1) - actors)


def cpu_state(net) -> dict:
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


def train_step(net, optimizer, states, policies, values, *, epochs: int, batch: int, rng, device: str = "cpu") -> float:
    net.train()
    losses = []
    for _ in range(epochs):
        order = rng.permutation(len(states))
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            x = torch.from_numpy(states[idx]).to(device)
            out = net({"observation/board": x})
            target = torch.from_numpy(policies[idx]).to(device)
            policy_loss = -(target * torch.log_softmax(out["policy_logits"], -1)).sum(-1).mean()
            value_loss = ((out["value"] - torch.from_numpy(values[idx]).to(device)) ** 2).mean()
            loss = policy_loss + value_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    net.eval()
    return float(np.mean(losses))


def shown(path: pathlib.Path | None) -> str | None:
    """A checkpoint as the results name it: relative to the repository when inside it, else its file name."""
    if path is None:
        return None
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def random_starts(game, count: int, max_plies: int, rng) -> list:
    """Positions after 0..max_plies uniformly random moves (never terminal): self-play then also learns positions
    that strong play never reaches, such as a reward request may ask about."""
    starts = []
    while len(starts) < count:
        state = game.initial_state()
        for _ in range(int(rng.integers(0, max_plies + 1))):
            state = game.next_state(state, int(rng.choice(np.flatnonzero(game.legal_mask(state)))))
            if game.terminal(state):
                break
        if not game.terminal(state):
            starts.append(state)
    return starts


def play_through(url: str, game, model: str, config: MCTSConfig, count: int, starts: list | None, rng,
                 temperature_moves: int) -> list:
    """``count`` recorded self-play games through one connection to the model server at ``url``."""
    pool = ClientPool([url], connections_per_server=1).start(wait_s=60)
    try:
        agent = Agent("mcts", PolicyEvaluator(PoolPolicy(pool, model)), config, noise=True)
        return play_games(game, [(agent, agent)] * count, rng, temperature_moves=temperature_moves, record=True,
                          starts=starts)
    finally:
        pool.close()


def actor_games(url: str, game_name: str, config: MCTSConfig, count: int, starts: list | None, seed: int,
                temperature_moves: int) -> list:
    """One self-play actor's share of an iteration. Runs in a spawned process, so that actors search in parallel
    and the server batches all their leaves together."""
    return play_through(url, make_game(game_name), game_name, config, count, starts, np.random.default_rng(seed),
                        temperature_moves)


def self_play(game, args, config: MCTSConfig, url: str, rng, actors) -> list:
    """One iteration's ``--games`` games: in this process, or split over the ``actors`` process pool."""
    starts = random_starts(game, args.games, args.random_plies, rng) if args.random_plies else None
    if actors is None:
        return play_through(url, game, args.game, config, args.games, starts, rng, args.temperature_moves)
    shares = [share for share in np.array_split(np.arange(args.games), args.actors) if len(share)]
    futures = [actors.submit(actor_games, url, args.game, config, len(share),
                             None if starts is None else [starts[g] for g in share], int(rng.integers(2**63)),
                             args.temperature_moves) for share in shares]
    return [result for future in futures for result in future.result()]


def train(args, game, net_cls, net, checkpoint: pathlib.Path, out: pathlib.Path, rng, actors,
          started: float) -> list[dict]:
    """The AlphaZero loop: each iteration serves the current weights, plays ``--games`` self-play games through
    that server and trains on the last ``--window`` iterations' positions. The weights go to ``out`` after
    every iteration (an interrupted run loses at most one), and to ``<out>.iterN.pt`` every
    ``--snapshot-every`` iterations. Returns the per-iteration figures."""
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, weight_decay=1e-4)
    config = MCTSConfig(simulations=args.simulations, leaves_per_round=8, selection=args.selection)
    buffer: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    history: list[dict] = []
    for iteration in range(args.iterations):
        if args.minutes is not None and time.monotonic() - started > 60 * args.minutes:
            break
        server = serve(net_cls, {args.game: checkpoint}, args.device, server_threads(args.server_threads, args.actors))
        try:
            results = self_play(game, args, config, server.url, rng, actors)
        finally:
            server.stop()
        states = np.stack([s for r in results for s in r.states])
        policies = np.stack([p for r in results for p in r.policies])
        values = value_targets(results, args.value_target)
        new_positions = len(states)
        if isinstance(game, ConnectFour):
            mirrored = mirror_connect4(game, states, policies)
            states, policies, values = (np.concatenate([states, mirrored[0]]), np.concatenate([policies, mirrored[1]]),
                                        np.concatenate([values, values]))
        buffer = (buffer + [(states, policies, values)])[-args.window :]
        data = [np.concatenate(parts) for parts in zip(*buffer)]
        loss = train_step(net, optimizer, *data, epochs=args.epochs, batch=256, rng=rng, device=args.device)
        torch.save(net.state_dict(), checkpoint)
        torch.save(cpu_state(net), out)
        if args.snapshot_every and (iteration + 1) % args.snapshot_every == 0:
            torch.save(cpu_state(net), out.with_name(f"{out.stem}.iter{iteration + 1}{out.suffix}"))
        outcomes = [r.outcome for r in results]
        history.append({"iteration": iteration, "games": len(results), "new_positions": new_positions,
                        "positions": len(data[0]), "loss": loss,
                        "first_player_wins": sum(o > 0 for o in outcomes), "draws": sum(o == 0 for o in outcomes),
                        "seconds": round(time.monotonic() - started, 1)})
        print(f"iter {iteration:2d}  positions {len(data[0]):6d}  loss {loss:.3f}  "
              f"p0 wins {history[-1]['first_player_wins']:3d}/{args.games}  {time.monotonic() - started:6.1f}s", flush=True)
    return history


def match(game, ours: Agent, theirs: Agent, games: int, seed: int) -> dict:
    """``games`` games, each side first in half of them; our score (a draw counts half)."""
    seats = [(ours, theirs) if g % 2 == 0 else (theirs, ours) for g in range(games)]
    results = play_games(game, seats, np.random.default_rng(seed), temperature_moves=2)
    return match_score(results, [g % 2 for g in range(games)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--game", choices=sorted(NETS), required=True)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--minutes", type=float, default=None, help="stop starting iterations after this wall time")
    parser.add_argument("--games", type=int, default=64, help="self-play games per iteration, all in flight at once")
    parser.add_argument("--simulations", type=int, default=48)
    parser.add_argument("--selection", choices=SELECTIONS, default=MCTSConfig.selection)
    parser.add_argument("--temperature-moves", type=int, default=8)
    parser.add_argument("--random-plies", type=int, default=0,
                        help="start each self-play game after 0..N uniformly random moves (0: from the empty board)")
    parser.add_argument("--value-target", choices=VALUE_TARGETS, default="outcome",
                        help="outcome: the game's result (AlphaZero); mixed: its mean with the search's root value "
                             "(exact where the search proved the root), less noisy")
    parser.add_argument("--window", type=int, default=4, help="iterations of positions kept for training")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--init", default=None, help="checkpoint to start from (default: the shipped one; 'none': scratch)")
    parser.add_argument("--previous", default=None,
                        help="the network the result is matched against (default: the --init weights)")
    parser.add_argument("--eval-games", type=int, default=64)
    parser.add_argument("--eval-simulations", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="where the model server and the training run (cpu, cuda)")
    parser.add_argument("--actors", type=int, default=1,
                        help="self-play processes, sharing each iteration's model server, which batches their leaves "
                             "together (1: the games are played in this process)")
    parser.add_argument("--server-threads", type=int, default=None,
                        help="the model server's torch threads (default: the cores the actors leave, at least 1)")
    parser.add_argument("--snapshot-every", type=int, default=0,
                        help="also keep the weights after every N-th iteration as <out>.iterN.pt (0: never)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="checkpoint path (default: the shipped one)")
    parser.add_argument("--results", default=None, help="JSON summary (default: bench/results/selfplay_training_<game>.json)")
    args = parser.parse_args()
    if args.random_plies < 0:
        parser.error(f"--random-plies must be >= 0, got {args.random_plies}")
    if args.iterations < 0:
        parser.error(f"--iterations must be >= 0 (0: only evaluate --init against --previous), got {args.iterations}")
    if args.snapshot_every < 0:
        parser.error(f"--snapshot-every must be >= 0, got {args.snapshot_every}")
    if args.server_threads is not None and args.server_threads < 1:
        parser.error(f"--server-threads must be at least 1, got {args.server_threads}")
    for name in ("games", "simulations", "window", "epochs", "eval_games", "eval_simulations", "actors"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.eval_games % 2:
        parser.error(f"--eval-games must be even (each side moves first half the time), got {args.eval_games}")

    net_cls, filename = NETS[args.game]
    shipped = ROOT / "gpu_worker" / "checkpoints" / filename
    out = pathlib.Path(args.out or shipped)
    init = None if args.init == "none" else pathlib.Path(args.init or shipped)
    if init is not None and not init.is_file():
        parser.error(f"--init: no checkpoint at {init}")
    if args.previous is not None and not pathlib.Path(args.previous).is_file():
        parser.error(f"--previous: no checkpoint at {args.previous}")
    game = make_game(args.game)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    net = net_cls()
    work = pathlib.Path(tempfile.mkdtemp(prefix="selfplay-"))
    previous = work / "previous.pt"
    if init is not None:
        net.load_state_dict(torch.load(init, map_location="cpu", weights_only=True))
    if args.previous is not None:
        previous.write_bytes(pathlib.Path(args.previous).read_bytes())
    else:
        torch.save(net.state_dict(), previous)
    net.to(args.device)
    checkpoint = work / "current.pt"
    torch.save(net.state_dict(), checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    actors = (concurrent.futures.ProcessPoolExecutor(args.actors, mp_context=multiprocessing.get_context("spawn"))
              if args.actors > 1 else None)
    try:
        history = train(args, game, net_cls, net, checkpoint, out, rng, actors, started)
    finally:
        if actors is not None:
            actors.shutdown(cancel_futures=True)
    train_seconds = time.monotonic() - started
    torch.save(cpu_state(net), out)
    games_played = sum(h["games"] for h in history)
    positions_played = sum(h["new_positions"] for h in history)
    # Evaluate through one model server hosting the new and the starting weights, at equal simulations.
    server = serve(net_cls, {"new": out, "previous": previous}, args.device, server_threads(args.server_threads, 1))
    pool = ClientPool([server.url], connections_per_server=1).start(wait_s=60)
    try:
        eval_config = MCTSConfig(simulations=args.eval_simulations, leaves_per_round=8, selection=args.selection)
        ours = Agent("mcts", PolicyEvaluator(PoolPolicy(pool, "new")), eval_config)
        before = Agent("mcts", PolicyEvaluator(PoolPolicy(pool, "previous")), eval_config)
        uniform = Agent("mcts", UniformEvaluator(), eval_config)
        vs_previous = match(game, ours, before, args.eval_games, 12345)
        vs_uniform = match(game, ours, uniform, args.eval_games, 12345)
    finally:
        pool.close()
        server.stop()
    summary = {"game": game.name, "checkpoint": out.name, "bytes": out.stat().st_size,
               "init": shown(init), "previous": shown(pathlib.Path(args.previous) if args.previous else init),
               "device": args.device,
               "cpu_cores": os.cpu_count(), "actors": args.actors,
               "server_threads": server_threads(args.server_threads, args.actors), "train_seconds": round(train_seconds, 1),
               "iterations": len(history), "games_per_iteration": args.games, "games": games_played,
               "positions": positions_played, "simulations": args.simulations, "selection": args.selection,
               "lr": args.lr, "epochs": args.epochs, "window": args.window, "random_plies": args.random_plies,
               "value_target": args.value_target,
               "eval": {"simulations": args.eval_simulations, "games": args.eval_games,
                        "vs_previous": vs_previous, "vs_uniform_mcts": vs_uniform},
               "history": history}
    result_path = pathlib.Path(args.results or ROOT / "bench" / "results" / f"selfplay_training_{args.game}.json")
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes) after {train_seconds:.0f}s of training, {games_played} games")
    for label, score in (("the starting network", vs_previous), ("uniform MCTS", vs_uniform)):
        print(f"vs {label} at {args.eval_simulations} simulations: score {score['score']:.3f} "
              f"({score['wins']}W {score['draws']}D {score['losses']}L)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
