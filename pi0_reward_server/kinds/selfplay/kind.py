"""Self-play: MCTS games of a hosted policy-value network against an opponent (``match``: the score is
the win rate, a draw counting half) or against itself (``generate``: training records).

A response: ``{"kind": "selfplay", "game": "connect4" | "dots_boxes", "rows", "cols", "games",
"simulations", "opponent": "random" | "mcts" | <hosted model>, "model", "seed", "mode", "leaves_per_round",
"temperature_moves", "c_puct", "max_positions"}`` or a registry name (``connect4_match``,
``dots_boxes_match``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping

import numpy as np

from pi0_reward_server.kinds.base import (MODEL_NAME, Limits, PolicyFor, TaskError, TaskResult, check_int,
                                          check_positive)

NAME = "selfplay"
FIELDS = ("kind", "task", "game", "rows", "cols", "games", "simulations", "opponent", "model", "seed", "mode",
          "leaves_per_round", "temperature_moves", "c_puct", "max_positions")


@dataclasses.dataclass(frozen=True)
class SelfPlayTask:
    """Games between a hosted network (MCTS) and an opponent, or self-play that yields records."""

    name: str
    game: str  # "connect4" or "dots_boxes"
    rows: int
    cols: int
    games: int
    simulations: int
    opponent: str  # "random", "mcts" (uniform evaluator) or a hosted model's name
    model: str  # the hosted network being scored (or generating)
    seed: int
    mode: str  # "match" (score = win rate, a draw counts half) or "generate" (training records)
    leaves_per_round: int
    temperature_moves: int
    c_puct: float
    max_positions: int
    backend: str = "selfplay"

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse(where: str, fields: dict[str, Any], defaults: Mapping[str, Any], limits: Limits,
          registry: Mapping[str, Mapping[str, Any]]) -> SelfPlayTask:
    from pi0_reward_server.kinds.selfplay.games import DEFAULT_SIZES, GAMES, make_game

    reference = fields.get("task")
    base = dict(registry[reference]) if isinstance(reference, str) and reference in registry else {}
    merged = {**base, **defaults}
    merged.update({k: v for k, v in fields.items() if k not in ("task", "kind")})
    game = merged.get("game")
    if not isinstance(game, str) or game not in GAMES:
        raise TaskError(f"{where}.game", f"unknown game {game!r}; known: {sorted(GAMES)}")
    rows = check_int(f"{where}.rows", merged.get("rows", DEFAULT_SIZES[game][0]), 1, 64)
    cols = check_int(f"{where}.cols", merged.get("cols", DEFAULT_SIZES[game][1]), 1, 64)
    try:
        board = make_game(game, rows, cols)
    except ValueError as exc:
        raise TaskError(f"{where}.rows", str(exc)) from None
    default_model = "connect4" if (game, rows, cols) == ("connect4", 6, 7) else board.name
    model = merged.get("model", default_model)
    if not isinstance(model, str) or not MODEL_NAME.match(model):
        raise TaskError(f"{where}.model", f"must be a hosted model's name, got {model!r}")
    opponent = merged.get("opponent", "mcts")
    if not isinstance(opponent, str) or not MODEL_NAME.match(opponent):
        raise TaskError(f"{where}.opponent", f"must be 'random', 'mcts' or a hosted model's name, got {opponent!r}")
    mode = merged.get("mode", "match")
    if mode not in ("match", "generate"):
        raise TaskError(f"{where}.mode", f"must be 'match' or 'generate', got {mode!r}")
    games = check_int(f"{where}.games", merged.get("games", 8), 1, limits.max_games)
    if mode == "match" and games % 2:
        raise TaskError(f"{where}.games", f"a match needs an even number of games (each side moves first half the time), got {games}")
    return SelfPlayTask(
        name=str(reference or f"selfplay:{game}"), game=game, rows=rows, cols=cols, games=games,
        simulations=check_int(f"{where}.simulations", merged.get("simulations", 32), 1, limits.max_simulations),
        opponent=opponent, model=model,
        seed=check_int(f"{where}.seed", merged.get("seed", limits.default_seed), 0, 2**31 - 1), mode=mode,
        leaves_per_round=check_int(f"{where}.leaves_per_round", merged.get("leaves_per_round", 8), 1, 64),
        temperature_moves=check_int(f"{where}.temperature_moves", merged.get("temperature_moves", 2 if mode == "match" else 8), 0, 1000),
        c_puct=check_positive(f"{where}.c_puct", merged.get("c_puct", 1.5)),
        max_positions=check_int(f"{where}.max_positions", merged.get("max_positions", limits.max_positions), 1, limits.max_positions),
    )


def run(task: SelfPlayTask, policy_for: PolicyFor, tracker=None) -> TaskResult:
    from pi0_reward_server.kinds.selfplay.games import make_game
    from pi0_reward_server.kinds.selfplay.mcts import MCTSConfig, UniformEvaluator
    from pi0_reward_server.kinds.selfplay.play import Agent, PolicyEvaluator, encode_records, match_score, play_games

    started = time.monotonic()
    game = make_game(task.game, task.rows, task.cols)
    config = MCTSConfig(simulations=task.simulations, leaves_per_round=task.leaves_per_round, c_puct=task.c_puct)
    rng = np.random.default_rng(task.seed)
    on_game_over = tracker.progress if tracker is not None else None
    network = PolicyEvaluator(policy_for(task.model))
    evaluators = [network]
    if task.mode == "generate":
        agent = Agent("mcts", network, config, noise=True)
        results = play_games(game, [(agent, agent)] * task.games, rng, temperature_moves=task.temperature_moves,
                             record=True, on_game_over=on_game_over)
        outcomes = [r.outcome for r in results]
        extra = {"games": task.games, "first_player_wins": sum(o > 0 for o in outcomes),
                 "draws": sum(o == 0 for o in outcomes), "records": encode_records(results, task.max_positions)}
        score = 1.0  # generation has no win rate; the records are the product
    else:
        ours = Agent("mcts", network, config)
        if task.opponent == "random":
            theirs = Agent("random")
        elif task.opponent == "mcts":
            theirs = Agent("mcts", UniformEvaluator(), config)
        else:
            opponent_net = PolicyEvaluator(policy_for(task.opponent))
            evaluators.append(opponent_net)
            theirs = Agent("mcts", opponent_net, config)
        seats = [(ours, theirs) if g % 2 == 0 else (theirs, ours) for g in range(task.games)]
        results = play_games(game, seats, rng, temperature_moves=task.temperature_moves, on_game_over=on_game_over)
        summary = match_score(results, [g % 2 for g in range(task.games)])
        score = summary.pop("score")
        extra = {"games": task.games, **summary}
    extra["network_calls"] = sum(e.calls for e in evaluators)
    extra["mean_batch_rows"] = sum(e.rows for e in evaluators) / max(1, sum(e.calls for e in evaluators))
    return TaskResult(
        score=score, steps=sum(len(r.moves) for r in results),
        servers=sorted(set().union(*(e.servers for e in evaluators))), seconds=time.monotonic() - started,
        task=task.describe(), extra=extra,
    )



def work(task: SelfPlayTask, limits: Limits) -> tuple[int, int]:
    from pi0_reward_server.kinds.selfplay.games import make_game

    longest = make_game(task.game, task.rows, task.cols).num_actions if task.game == "dots_boxes" else task.rows * task.cols
    return 0, task.games * task.simulations * longest


def units(task: SelfPlayTask) -> int:
    return task.games


def models(task: SelfPlayTask) -> list[str | None]:
    """The hosted networks whose versions fix the outcome: ours, and the opponent's when it is one."""
    return [task.model] + ([task.opponent] if task.opponent not in ("random", "mcts") else [])
