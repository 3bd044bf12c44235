"""Playing many games at once: matches for a win rate, self-play for training records.

All games in flight advance together: at each step the games whose mover is
an MCTS agent are searched together (:func:`mcts.search`), so one round of
their leaves is one batch for the evaluator, i.e. one explicit batch frame to
a model server. A network is reached through any ``BatchPolicy``
(``infer_batch(list_of_observations) -> (list_of_replies, server)``): the
client pool in production, a model in this process in tests. The network
receives ``observation/board`` (the game's encoding, float32) and returns
``policy_logits`` (A,) and ``value`` ().

Everything random (temperature sampling, Dirichlet noise, random players)
draws from one seeded generator in a fixed order, so a seeded run gives the
same games whichever way the network is reached.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import numpy as np

from pi0_reward_server.kinds.selfplay.games import Game
from pi0_reward_server.kinds.selfplay.mcts import Evaluator, MCTSConfig, masked_softmax, search_roots


class PolicyEvaluator:
    """An MCTS evaluator backed by a served policy-value network.

    A round larger than ``max_rows_per_call`` goes out as several batch frames,
    so it stays within what a server accepts in one frame (its ``max_queue``)."""

    def __init__(self, policy, model: str | None = None, *, max_rows_per_call: int = 512) -> None:
        self.policy = policy
        self.model = model
        self.max_rows_per_call = max_rows_per_call
        self.servers: set[str] = set()
        self.calls = 0
        self.rows = 0

    def evaluate(self, observations: np.ndarray, legal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        frames = [{"observation/board": obs} for obs in observations]
        if self.model is not None:
            frames = [{**f, "__model__": self.model} for f in frames]
        replies = []
        for start in range(0, len(frames), self.max_rows_per_call):
            chunk = frames[start : start + self.max_rows_per_call]
            answered, server = self.policy.infer_batch(chunk)
            if len(answered) != len(chunk):
                raise RuntimeError(f"network answered {len(answered)} evaluations for a batch of {len(chunk)}")
            replies.extend(answered)
            self.servers.add(server)
            self.calls += 1
        self.rows += len(frames)
        logits = np.stack([np.asarray(r["policy_logits"], dtype=np.float64) for r in replies])
        values = np.array([float(r["value"]) for r in replies])
        return masked_softmax(logits, legal), values


@dataclasses.dataclass
class Agent:
    """``kind`` is 'mcts' (with ``evaluator``) or 'random'."""

    kind: str
    evaluator: Evaluator | None = None
    config: MCTSConfig = dataclasses.field(default_factory=MCTSConfig)
    noise: bool = False


@dataclasses.dataclass
class GameResult:
    outcome: float  # +1 / -1 / 0 from player 0's view
    moves: list[int]
    states: list[np.ndarray] = dataclasses.field(default_factory=list)  # encodings, when recorded
    policies: list[np.ndarray] = dataclasses.field(default_factory=list)  # the search's policy targets
    players: list[int] = dataclasses.field(default_factory=list)  # who was to move
    values: list[float] = dataclasses.field(default_factory=list)  # the search's root value, for the mover


def play_games(
    game: Game,
    seats: list[tuple[Agent, Agent]],
    rng: np.random.Generator,
    *,
    temperature_moves: int = 0,
    record: bool = False,
    max_moves: int = 10_000,
    on_game_over=None,
    starts: list | None = None,
) -> list[GameResult]:
    """Play ``len(seats)`` games; game g has ``seats[g][0]`` as player 0 and ``seats[g][1]`` as player 1.

    The first ``temperature_moves`` moves of each game are sampled from the
    search's policy (the visit distribution for PUCT, the improved policy for
    Gumbel; temperature 1), later ones are the search's own choice. Recorded
    policies are the same search policies: the training targets. ``starts``
    (one state per game) begins games elsewhere than the initial position.
    """
    agents: list[Agent] = []
    for pair in seats:
        for agent in pair:
            if all(agent is not a for a in agents):
                agents.append(agent)
    if starts is not None and len(starts) != len(seats):
        raise ValueError(f"starts has {len(starts)} states for {len(seats)} games")
    states = list(starts) if starts is not None else [game.initial_state() for _ in seats]
    results = [GameResult(0.0, []) for _ in seats]
    live = [g for g in range(len(seats)) if not game.terminal(states[g])]
    while live:
        actions: dict[int, int] = {}
        for agent in agents:  # a fixed order keeps the random draws reproducible
            movers = [g for g in live if seats[g][states[g].to_play] is agent]
            if not movers:
                continue
            if agent.kind == "random":
                for g in movers:
                    actions[g] = int(rng.choice(np.flatnonzero(game.legal_mask(states[g]))))
                continue
            searched = search_roots(game, [states[g] for g in movers], agent.evaluator, agent.config, rng,
                                    add_noise=agent.noise)
            for g, result in zip(movers, searched):
                if len(results[g].moves) < temperature_moves:
                    actions[g] = int(rng.choice(len(result.policy), p=result.policy))
                else:
                    actions[g] = result.action
                if record:
                    results[g].states.append(game.encode(states[g]))
                    results[g].policies.append(result.policy.astype(np.float32))
                    results[g].players.append(states[g].to_play)
                    results[g].values.append(result.value)
        for g in live:
            states[g] = game.next_state(states[g], actions[g])
            results[g].moves.append(actions[g])
        before = len(live)
        live = [g for g in live if not game.terminal(states[g]) and len(results[g].moves) < max_moves]
        if on_game_over is not None and len(live) < before:
            on_game_over(len(seats) - len(live))  # games finished so far
    for g, state in enumerate(states):
        results[g].outcome = game.outcome(state) if game.terminal(state) else 0.0
    return results


def match_score(results: list[GameResult], model_seats: list[int]) -> dict[str, Any]:
    """The model's win rate over the games, a draw counting half."""
    wins = draws = losses = 0
    for result, seat in zip(results, model_seats):
        outcome = result.outcome if seat == 0 else -result.outcome
        wins += outcome > 0
        draws += outcome == 0
        losses += outcome < 0
    return {"score": (wins + 0.5 * draws) / len(results), "wins": wins, "draws": draws, "losses": losses}


def encode_records(results: list[GameResult], max_positions: int) -> dict[str, Any]:
    """Training records in a compact form: base64 of little-endian arrays.

    ``states``: float16 (P, obs_dim) encodings from the mover's view;
    ``policies``: float16 (P, A) the search's policies (``SearchResult.policy``);
    ``values``: int8 (P,) final outcome from the mover's view (+1 win, 0 draw, -1 loss). At most
    ``max_positions`` positions, whole games first; ``truncated`` says if
    any were left out.
    """
    states, policies, values, kept_games = [], [], [], 0
    truncated = False
    for result in results:
        if len(states) + len(result.states) > max_positions:
            truncated = True
            break
        for state, policy, player in zip(result.states, result.policies, result.players):
            states.append(state)
            policies.append(policy)
            values.append(result.outcome if player == 0 else -result.outcome)
        kept_games += 1

    def b64(array: np.ndarray) -> str:
        return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")

    obs_dim = len(states[0]) if states else 0
    actions = len(policies[0]) if policies else 0
    return {
        "format": "base64 little-endian: states float16 (P, obs_dim), policies float16 (P, A), values int8 (P,)",
        "positions": len(states), "games": kept_games, "obs_dim": obs_dim, "num_actions": actions,
        "truncated": truncated,
        "states": b64(np.asarray(states, dtype="<f2").reshape(len(states), obs_dim)),
        "policies": b64(np.asarray(policies, dtype="<f2").reshape(len(policies), actions)),
        "values": b64(np.asarray(values, dtype="<i1")),
    }


def decode_records(records: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inverse of :func:`encode_records`: (states, policies, values) arrays."""
    p = records["positions"]
    states = np.frombuffer(base64.b64decode(records["states"]), dtype="<f2").reshape(p, records["obs_dim"])
    policies = np.frombuffer(base64.b64decode(records["policies"]), dtype="<f2").reshape(p, records["num_actions"])
    values = np.frombuffer(base64.b64decode(records["values"]), dtype="<i1")
    return states.astype(np.float32), policies.astype(np.float32), values.astype(np.float32)
