"""PUCT Monte Carlo tree search (AlphaZero), searching many trees in batched rounds.

Silver et al., "A general reinforcement learning algorithm that masters chess,
shogi, and Go through self-play", Science 2018 (AlphaZero), and its
supplementary materials: at a node s, select

    a* = argmax_a  Q(s, a) + c_puct * P(s, a) * sqrt(N(s)) / (1 + N(s, a))

where N(s) = sum_b N(s, b), Q(s, a) = W(s, a) / N(s, a) (0 while unvisited),
and P are the network's priors (masked to legal moves). At the root, priors
are mixed with Dirichlet noise: P = (1 - eps) * P + eps * Dir(alpha), with
AlphaZero's eps = 0.25 and alpha scaled inversely to the number of legal
moves (0.3 for chess's ~35 moves), here alpha = 10 / num_actions, capped at 1.

Values are stored from the perspective of the player to move at the node
that owns the edge. A leaf's value v is from its own player-to-move's view;
backing up, each edge on the path gets +v if its node's player is the leaf's
player and -v otherwise. Dots and Boxes, where a player can move twice in a
row, needs exactly this (a bare ``-v`` flip per ply would be wrong).

Batching: :func:`search` runs the searches of many games together. Each round
it selects up to ``leaves_per_round`` leaves per tree, using a virtual loss
(each edge on a pending path counts as a visit that lost) so the selections
spread over different leaves, then evaluates every round's leaves in one call
to the evaluator (one explicit batch frame to a model server), expands them
and backs their values up, removing the virtual loss.

Shapes: ``observations`` (B, obs_dim) float32, ``legal`` (B, A) bool,
``priors`` (B, A) float summing to 1 over legal moves, ``values`` (B,) in [-1, 1].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import numpy as np

from pi0_reward_server.kinds.selfplay.games import Game

DIRICHLET_WEIGHT = 0.25  # AlphaZero's epsilon
DIRICHLET_SCALE = 10.0  # alpha = DIRICHLET_SCALE / num_actions: chess 0.3 ~ 10 / 35 legal moves


class Evaluator(Protocol):
    def evaluate(self, observations: np.ndarray, legal: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class MCTSConfig:
    simulations: int = 64
    leaves_per_round: int = 8
    c_puct: float = 1.5
    dirichlet_alpha: float | None = None  # None: min(1, DIRICHLET_SCALE / num_actions)
    dirichlet_weight: float = DIRICHLET_WEIGHT
    virtual_loss: float = 1.0

    def __post_init__(self) -> None:
        if self.simulations < 1 or self.leaves_per_round < 1:
            raise ValueError("simulations and leaves_per_round must be at least 1")
        if self.c_puct <= 0 or not 0 <= self.dirichlet_weight <= 1 or self.virtual_loss < 0:
            raise ValueError("c_puct must be > 0, dirichlet_weight in [0, 1], virtual_loss >= 0")
        if self.dirichlet_alpha is not None and self.dirichlet_alpha <= 0:
            raise ValueError("dirichlet_alpha must be > 0")


class Node:
    __slots__ = ("state", "to_play", "terminal", "value", "legal", "P", "N", "W", "children", "expanded")

    def __init__(self, game: Game, state) -> None:
        self.state = state
        self.to_play = state.to_play
        self.terminal = game.terminal(state)
        # A terminal node's value, from its player-to-move's view.
        self.value = (game.outcome(state) if self.to_play == 0 else -game.outcome(state)) if self.terminal else 0.0
        self.legal = None if self.terminal else game.legal_mask(state)
        self.P = self.N = self.W = None
        self.children: dict[int, Node] = {}
        self.expanded = False

    def expand(self, priors: np.ndarray) -> None:
        self.P = priors
        self.N = np.zeros(len(priors))
        self.W = np.zeros(len(priors))
        self.expanded = True

    def select(self, c_puct: float) -> int:
        sqrt_total = math.sqrt(max(1.0, float(self.N.sum())))
        q = np.divide(self.W, self.N, out=np.zeros_like(self.W), where=self.N > 0)
        score = q + c_puct * self.P * sqrt_total / (1.0 + self.N)
        score[~self.legal] = -np.inf
        return int(np.argmax(score))


class UniformEvaluator:
    """Uniform priors over legal moves and value 0: MCTS with no knowledge (the baseline)."""

    def evaluate(self, observations: np.ndarray, legal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        legal = legal.astype(np.float64)
        return legal / legal.sum(axis=1, keepdims=True), np.zeros(len(legal))


def masked_softmax(logits: np.ndarray, legal: np.ndarray) -> np.ndarray:
    logits = np.where(legal, logits.astype(np.float64), -np.inf)
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def _evaluate_and_expand(game: Game, evaluator: Evaluator, nodes: list[Node]) -> np.ndarray:
    observations = np.stack([game.encode(n.state) for n in nodes])
    legal = np.stack([n.legal for n in nodes])
    priors, values = evaluator.evaluate(observations, legal)
    for node, p in zip(nodes, priors):
        node.expand(np.asarray(p, dtype=np.float64))
    return np.asarray(values, dtype=np.float64)


def _backup(path: list[tuple[Node, int]], leaf_player: int, value: float, virtual_loss: float) -> None:
    for node, action in path:
        node.N[action] += 1.0 - virtual_loss
        node.W[action] += virtual_loss + (value if node.to_play == leaf_player else -value)


def search(
    game: Game, states: list, evaluator: Evaluator, config: MCTSConfig, rng: np.random.Generator, *, add_noise: bool
) -> list[np.ndarray]:
    """Search every (non-terminal) state; returns the root visit counts, shape (A,) each."""
    roots = [Node(game, s) for s in states]
    _evaluate_and_expand(game, evaluator, roots)
    if add_noise and config.dirichlet_weight > 0:
        alpha = config.dirichlet_alpha or min(1.0, DIRICHLET_SCALE / game.num_actions)
        for root in roots:
            legal = np.flatnonzero(root.legal)
            noise = np.zeros_like(root.P)
            noise[legal] = rng.dirichlet([alpha] * len(legal))
            root.P = (1 - config.dirichlet_weight) * root.P + config.dirichlet_weight * noise
    vl = config.virtual_loss
    done = [0] * len(roots)  # completed simulations per tree; a collision does not count
    while min(done) < config.simulations:
        pending: list[tuple[list[tuple[Node, int]], Node]] = []
        for t, root in enumerate(roots):
            chosen: set[int] = set()
            for _ in range(min(config.leaves_per_round, config.simulations - done[t])):
                node, path = root, []
                while node.expanded and not node.terminal:
                    action = node.select(config.c_puct)
                    node.N[action] += vl  # virtual loss: a visit that lost
                    node.W[action] -= vl
                    path.append((node, action))
                    child = node.children.get(action)
                    if child is None:
                        child = node.children[action] = Node(game, game.next_state(node.state, action))
                    node = child
                if node.terminal:
                    _backup(path, node.to_play, node.value, vl)
                    done[t] += 1
                elif id(node) in chosen:  # this round already waits on that leaf: try again next round
                    for parent, action in path:
                        parent.N[action] -= vl
                        parent.W[action] += vl
                else:
                    chosen.add(id(node))
                    pending.append((path, node))
                    done[t] += 1
        # Each tree's first selection of a round never collides, so every round makes progress.
        if pending:
            values = _evaluate_and_expand(game, evaluator, [leaf for _, leaf in pending])
            for (path, leaf), value in zip(pending, values):
                _backup(path, leaf.to_play, float(value), vl)
    return [root.N.copy() for root in roots]


def choose_action(visits: np.ndarray, rng: np.random.Generator, *, temperature: float) -> int:
    """Temperature 1: sample in proportion to visits; 0: the most visited (lowest index on a tie)."""
    if temperature <= 0:
        return int(np.argmax(visits))
    weights = visits ** (1.0 / temperature)
    return int(rng.choice(len(visits), p=weights / weights.sum()))
