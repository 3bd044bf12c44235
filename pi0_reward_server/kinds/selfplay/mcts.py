"""Monte Carlo tree search for two-player games, searching many trees in batched rounds.

Two selection rules share one tree, one backup and one batching loop:

``selection="puct"`` (AlphaZero; Silver et al., Science 2018, and its
supplementary materials): at a node s, select

    a* = argmax_a  Q(s, a) + c_puct * P(s, a) * sqrt(N(s)) / (1 + N(s, a))

where N(s) = sum_b N(s, b), Q(s, a) = W(s, a) / N(s, a), and P are the
network's priors (masked to legal moves). An unvisited move's Q is 0 in
AlphaZero; with ``fpu_reduction`` set (0.2 by default, which measured
stronger in bench/bench_selfplay_strength.py) it is the node's value estimate
minus that reduction (first-play urgency, as Leela Chess Zero does). At the root,
priors are mixed with Dirichlet noise: P = (1 - eps) * P + eps * Dir(alpha),
with AlphaZero's eps = 0.25 and alpha = 10 / num_actions, capped at 1.

``selection="gumbel"`` (Gumbel MuZero; Danihelka et al., "Policy improvement
by planning with Gumbel", ICLR 2022, as DeepMind's mctx implements it): the
root samples without replacement the ``max_considered`` moves with the top
g(a) + logits(a) (g Gumbel noise, 0 without noise) and spends the simulations
on them by sequential halving, keeping the half with the best
g + logits + sigma(q); the chosen move is the survivor. Inside the tree,
select argmax_a pi'(a) - N(a) / (1 + N(s)), with pi' = softmax(logits +
sigma(completed Q)). Completed Q gives an unvisited move the node's mixed
value v_mix (the network's value blended with the visited moves' Q, weighted
by their priors, paper eq. 33) instead of 0; sigma(q) = (c_visit + max_b
N(b)) * c_scale * q after a min-max rescaling of q to [0, 1]. The improved
policy softmax(logits + sigma(completed Q)) is the training target.

``solver=True`` (MCTS-Solver; Winands, Bjornsson and Saito, "Monte-Carlo Tree
Search Solver", CG 2008): exact outcomes are propagated up the tree. A node is
a proven win when one child is a proven win for it, and proven when all of
its children are (it is then worth the best of them). A proven child's exact
value replaces its sampled Q, a proven loss is never selected, a proven node
is backed up like a terminal one, and a proven root ends its search with a
proven-best move. With ``decisive=True`` (Teytaud and Teytaud, "On the huge
benefit of decisive moves in Monte-Carlo tree search", CIG 2010) a node looks
one move ahead when it is expanded, so a move that ends the game is known at
once: an immediate win is always taken and a move that lets the opponent win
at once is proven lost after its single visit.

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
import functools
import math
from typing import Protocol

import numpy as np

from pi0_reward_server.kinds.selfplay.games import Game

DIRICHLET_WEIGHT = 0.25  # AlphaZero's epsilon
DIRICHLET_SCALE = 10.0  # alpha = DIRICHLET_SCALE / num_actions: chess 0.3 ~ 10 / 35 legal moves
GUMBEL_C_VISIT = 50.0  # mctx's qtransform_completed_by_mix_value defaults (maxvisit_init, value_scale)
GUMBEL_C_SCALE = 0.1
LOG_FLOOR = 1e-12  # a legal move with prior 0 still gets a finite logit
SELECTIONS = ("puct", "gumbel")


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
    selection: str = "puct"  # "puct" (AlphaZero) or "gumbel" (Gumbel MuZero): PUCT measured stronger here
    solver: bool = True  # MCTS-Solver: proven outcomes decide their parents
    decisive: bool = True  # look one move ahead at expansion for moves that end the game (needs solver)
    fpu_reduction: float | None = 0.2  # PUCT only; None: an unvisited move's Q is 0 (AlphaZero)
    max_considered: int = 16  # Gumbel: moves sampled at the root
    c_visit: float = GUMBEL_C_VISIT
    c_scale: float = GUMBEL_C_SCALE

    def __post_init__(self) -> None:
        if self.simulations < 1 or self.leaves_per_round < 1:
            raise ValueError("simulations and leaves_per_round must be at least 1")
        if self.c_puct <= 0 or not 0 <= self.dirichlet_weight <= 1 or self.virtual_loss < 0:
            raise ValueError("c_puct must be > 0, dirichlet_weight in [0, 1], virtual_loss >= 0")
        if self.dirichlet_alpha is not None and self.dirichlet_alpha <= 0:
            raise ValueError("dirichlet_alpha must be > 0")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.decisive and not self.solver:
            raise ValueError("decisive needs solver: a decisive move is only useful as a proven outcome")
        if self.fpu_reduction is not None and self.fpu_reduction < 0:
            raise ValueError("fpu_reduction must be >= 0 (or None for AlphaZero's Q = 0)")
        if self.max_considered < 1 or self.c_visit < 0 or self.c_scale <= 0:
            raise ValueError("max_considered must be >= 1, c_visit >= 0, c_scale > 0")


@dataclasses.dataclass
class SearchResult:
    """One root's search. ``visits`` (A,); ``policy`` (A,) the training target (visit distribution for PUCT,
    the improved policy for Gumbel, either without the moves proven lost; uniform over the proven-best moves for
    a root proven won or drawn, over all legal moves for a root proven lost); ``action`` the search's move;
    ``proven`` the root's exact value for its player to move, or None; ``value`` the search's value of the root
    for its player to move: ``proven`` where known, else the network's value of the root averaged with every
    simulation's backed-up value (a training target with less noise than the game's outcome)."""

    visits: np.ndarray
    policy: np.ndarray
    action: int
    proven: float | None
    value: float = 0.0


class Node:
    __slots__ = ("state", "to_play", "terminal", "value", "legal", "P", "logits", "raw_value", "N", "W", "total",
                 "children", "expanded", "proven", "child_proven", "blocked", "any_proven")

    def __init__(self, game: Game, state) -> None:
        self.state = state
        self.to_play = state.to_play
        self.terminal = game.terminal(state)
        # A terminal node's value, from its player-to-move's view.
        self.value = (game.outcome(state) if self.to_play == 0 else -game.outcome(state)) if self.terminal else 0.0
        self.legal = None if self.terminal else game.legal_mask(state)
        self.P = self.logits = self.N = self.W = self.child_proven = self.blocked = None
        self.raw_value = self.total = 0.0  # total: N.sum(), kept up to date
        self.any_proven = False
        self.children: dict[int, Node] = {}
        self.expanded = False
        self.proven: float | None = self.value if self.terminal else None

    def expand(self, priors: np.ndarray, value: float) -> None:
        self.P = priors
        self.logits = np.where(self.legal, np.log(np.maximum(priors, LOG_FLOOR)), -np.inf)
        self.raw_value = value
        self.N = np.zeros(len(priors))
        self.W = np.zeros(len(priors))
        self.child_proven = np.full(len(priors), np.nan)  # exact values of proven children, this node's view
        self.blocked = ~self.legal  # never selected: illegal moves and proven losses
        self.expanded = True

    def child(self, game: Game, action: int) -> Node:
        child = self.children.get(action)
        if child is None:
            child = self.children[action] = Node(game, game.next_state(self.state, action))
        return child

    def look_ahead(self, game: Game) -> None:
        """Decisive moves: create the children that end the game, so their outcomes are known before a visit."""
        if not game.may_end_next(self.state):
            return
        for action in np.flatnonzero(self.legal):
            child = self.child(game, int(action))
            if child.terminal:
                self.learn(int(action), child.value if child.to_play == self.to_play else -child.value)
        self._settle()

    def learn(self, action: int, value: float) -> None:
        """A child is proven: remember its exact value (this node's view); a proven loss is never selected again."""
        self.child_proven[action] = value
        self.any_proven = True
        if value == -1.0:
            self.blocked[action] = True  # if every move loses, the node is proven and no longer selects

    def _settle(self) -> bool:
        """Prove this node from its children if they decide it; True when it is (now) proven."""
        known = self.child_proven[self.legal]
        if np.any(known == 1.0):
            self.proven = 1.0
        elif not np.isnan(known).any():
            self.proven = float(known.max())
        return self.proven is not None

    # -- values ---------------------------------------------------------------------------------------------
    def search_value(self) -> float:
        """The root's value for its player to move: proven, or the raw value and the backed-up values averaged."""
        if self.proven is not None:
            return float(self.proven)
        if self.N is None:
            return float(self.raw_value)
        return float((self.raw_value + self.W.sum()) / (1.0 + self.total))

    def q(self) -> np.ndarray:
        return np.divide(self.W, self.N, out=np.zeros_like(self.W), where=self.N > 0)

    def mixed_value(self, q: np.ndarray) -> float:
        """v_mix (Gumbel paper eq. 33): the network's value blended with the visited moves' prior-weighted Q."""
        visited = self.N > 0
        total = self.total
        if total <= 0 or not visited.any():
            return self.raw_value
        weight = float(self.P[visited].sum())
        mean_q = float((self.P[visited] * q[visited]).sum()) / max(weight, LOG_FLOOR)
        return (self.raw_value + total * mean_q) / (1.0 + total)

    def completed_q(self, solver: bool) -> np.ndarray:
        q = self.q()
        completed = np.where(self.N > 0, q, self.mixed_value(q))
        if solver and self.any_proven:
            known = ~np.isnan(self.child_proven)
            completed[known] = self.child_proven[known]
        return completed

    def sigma(self, completed: np.ndarray, c_visit: float, c_scale: float) -> np.ndarray:
        """sigma(q): completed Q rescaled to [0, 1] over the legal moves, times (c_visit + max N) * c_scale."""
        legal_q = completed[self.legal]
        low, high = float(legal_q.min()), float(legal_q.max())
        scaled = (completed - low) / max(high - low, 1e-8)
        return (c_visit + float(self.N.max())) * c_scale * scaled

    def improved_policy(self, config: MCTSConfig) -> np.ndarray:
        """softmax(logits + sigma(completed Q)) over the legal moves."""
        completed = self.completed_q(config.solver)
        return _softmax(self.logits + self.sigma(completed, config.c_visit, config.c_scale))

    # -- selection ------------------------------------------------------------------------------------------
    def _forbidden(self, solver: bool) -> np.ndarray:
        """Illegal moves, and (with the solver) proven losses while some move is not one."""
        forbidden = ~self.legal
        if solver:
            lost = self.child_proven == -1.0
            if not np.all(lost[self.legal]):
                forbidden = forbidden | lost
        return forbidden

    def select(self, config: MCTSConfig) -> int:
        if config.selection == "gumbel":
            probs = self.improved_policy(config)
            score = probs - self.N / (1.0 + self.total)
        else:
            sqrt_total = math.sqrt(max(1.0, self.total))
            q = self.q()
            if config.fpu_reduction is not None:
                q = np.where(self.N > 0, q, self.mixed_value(q) - config.fpu_reduction)
            if self.any_proven:
                known = ~np.isnan(self.child_proven)
                q[known] = self.child_proven[known]
            score = q + config.c_puct * self.P * sqrt_total / (1.0 + self.N)
        score[self.blocked] = -np.inf
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


def _softmax(logits: np.ndarray) -> np.ndarray:
    weights = np.exp(logits - logits[np.isfinite(logits)].max())
    return weights / weights.sum()


@functools.lru_cache(maxsize=256)
def considered_visits(max_considered: int, simulations: int) -> tuple[int, ...]:
    """Sequential halving as a visit schedule (mctx's get_sequence_of_considered_visits): entry i is the visit
    count a root move must have to be picked by simulation i, so each phase gives every surviving move equal
    visits and then keeps the better half."""
    if max_considered <= 1:
        return tuple(range(simulations))
    log2max = int(math.ceil(math.log2(max_considered)))
    sequence: list[int] = []
    visits = [0] * max_considered
    considered = max_considered
    while len(sequence) < simulations:
        extra = max(1, int(simulations / (log2max * considered)))
        for _ in range(extra):
            sequence.extend(visits[:considered])
            for i in range(considered):
                visits[i] += 1
        considered = max(2, considered // 2)
    return tuple(sequence[:simulations])


class _Root:
    """A root with what Gumbel selection needs: the noise, and visits counted when begun (virtual loss aside)."""

    def __init__(self, node: Node, gumbel: np.ndarray, config: MCTSConfig) -> None:
        self.node = node
        self.gumbel = gumbel
        self.begun = np.zeros(len(node.P), dtype=np.int64)
        considered = min(config.max_considered, int(node.legal.sum()))
        self.schedule = considered_visits(considered, config.simulations)

    def gumbel_scores(self, config: MCTSConfig) -> np.ndarray:
        node = self.node
        completed = node.completed_q(config.solver)
        return self.gumbel + node.logits + node.sigma(completed, config.c_visit, config.c_scale)

    def select(self, config: MCTSConfig, simulation: int) -> int:
        if config.selection != "gumbel":
            return self.node.select(config)
        score = self.gumbel_scores(config)
        score[self.node._forbidden(config.solver)] = -np.inf
        target = self.schedule[min(simulation, len(self.schedule) - 1)]
        on_schedule = np.where(self.begun == target, score, -np.inf)
        if np.isfinite(on_schedule).any():
            return int(np.argmax(on_schedule))
        # Off schedule (a proven loss dropped out of a phase): the least visited of the allowed moves.
        allowed = np.isfinite(score)
        fewest = self.begun[allowed].min()
        return int(np.argmax(np.where(allowed & (self.begun == fewest), score, -np.inf)))

    def result(self, config: MCTSConfig) -> SearchResult:
        node = self.node
        visits = node.N.copy()
        if node.proven is not None and node.proven > -1.0:  # a proven win or draw: any move that keeps it
            best = node.legal & (node.child_proven == node.proven)
            policy = best / best.sum()
            action = int(np.argmax(np.where(best, visits + node.P, -np.inf)))
            return SearchResult(visits, policy.astype(np.float64), action, node.proven, node.search_value())
        forbidden = node._forbidden(config.solver)
        if config.selection == "gumbel":
            policy = node.improved_policy(config)
            score = self.gumbel_scores(config)
            most = self.begun[~forbidden].max()
            score[forbidden | (self.begun < most)] = -np.inf
            action = int(np.argmax(score))
        else:
            policy = visits.copy()
            action = int(np.argmax(np.where(forbidden, -np.inf, visits)))
        return SearchResult(visits, _target(policy, node, forbidden), action, node.proven, node.search_value())


def _target(policy: np.ndarray, node: Node, forbidden: np.ndarray) -> np.ndarray:
    """The training target (and the opening moves' sampling distribution) from a root's raw policy: proven losses
    get no mass while some move is not one, since sampling or learning them would play a known blunder. A root
    proven lost (every move loses, possibly proven at expansion before any simulation) gets the uniform policy
    over its legal moves: all of them are equally lost, so no move should be taught over another; it also covers
    a raw policy left with no mass (its visits all went to moves since proven lost)."""
    if node.proven == -1.0:
        return node.legal / node.legal.sum()
    policy = np.where(forbidden, 0.0, policy)
    total = float(policy.sum())
    return policy / total if total > 0 else ~forbidden / (~forbidden).sum()


def _evaluate_and_expand(game: Game, evaluator: Evaluator, nodes: list[Node], config: MCTSConfig) -> np.ndarray:
    observations = np.stack([game.encode(n.state) for n in nodes])
    legal = np.stack([n.legal for n in nodes])
    priors, values = evaluator.evaluate(observations, legal)
    values = np.asarray(values, dtype=np.float64)
    for node, p, v in zip(nodes, priors, values):
        node.expand(np.asarray(p, dtype=np.float64), float(v))
        if config.decisive:
            node.look_ahead(game)
    return values


def _backup(path: list[tuple[Node, int]], leaf_player: int, value: float, virtual_loss: float, solver: bool) -> None:
    for node, action in path:
        node.N[action] += 1.0 - virtual_loss
        node.total += 1.0 - virtual_loss
        node.W[action] += virtual_loss + (value if node.to_play == leaf_player else -value)
    if solver:
        _propagate_proof(path)


def _propagate_proof(path: list[tuple[Node, int]]) -> None:
    """MCTS-Solver: a proven child tells its parent its exact value; the parent may then be proven in turn."""
    for node, action in reversed(path):
        child = node.children[action]
        if child.proven is None or not np.isnan(node.child_proven[action]):
            return
        node.learn(action, child.proven if child.to_play == node.to_play else -child.proven)
        if node.proven is not None or not node._settle():
            return


def _undo_virtual_loss(path: list[tuple[Node, int]], virtual_loss: float) -> None:
    for parent, action in path:
        parent.N[action] -= virtual_loss
        parent.total -= virtual_loss
        parent.W[action] += virtual_loss


def search_roots(
    game: Game, states: list, evaluator: Evaluator, config: MCTSConfig, rng: np.random.Generator, *, add_noise: bool
) -> list[SearchResult]:
    """Search every (non-terminal) state together; one :class:`SearchResult` per state."""
    nodes = [Node(game, s) for s in states]
    _evaluate_and_expand(game, evaluator, nodes, config)
    roots = []
    for node in nodes:
        gumbel = np.zeros(len(node.P))
        if add_noise and config.selection == "gumbel":
            gumbel = rng.gumbel(size=len(node.P))
        elif add_noise and config.dirichlet_weight > 0:
            alpha = config.dirichlet_alpha or min(1.0, DIRICHLET_SCALE / game.num_actions)
            legal = np.flatnonzero(node.legal)
            noise = np.zeros_like(node.P)
            noise[legal] = rng.dirichlet([alpha] * len(legal))
            node.P = (1 - config.dirichlet_weight) * node.P + config.dirichlet_weight * noise
        roots.append(_Root(node, gumbel, config))
    vl = config.virtual_loss
    done = [0] * len(roots)  # simulations begun per tree; a collision does not count
    while True:
        live = [t for t, r in enumerate(roots) if done[t] < config.simulations and r.node.proven is None]
        if not live:
            break
        pending: list[tuple[list[tuple[Node, int]], Node]] = []
        for t in live:
            root = roots[t]
            chosen: set[int] = set()
            for _ in range(min(config.leaves_per_round, config.simulations - done[t])):
                if root.node.proven is not None:
                    break
                action = root.select(config, done[t])
                node, path = root.node, []
                while True:
                    node.N[action] += vl  # virtual loss: a visit that lost
                    node.total += vl
                    node.W[action] -= vl
                    path.append((node, action))
                    node = node.child(game, action)
                    if not node.expanded or node.proven is not None:
                        break
                    action = node.select(config)
                if node.proven is not None:  # terminal, or proven by the solver: its value is exact
                    root.begun[path[0][1]] += 1
                    _backup(path, node.to_play, node.proven, vl, config.solver)
                    done[t] += 1
                elif id(node) in chosen:  # this round already waits on that leaf: try again next round
                    _undo_virtual_loss(path, vl)
                else:
                    chosen.add(id(node))
                    root.begun[path[0][1]] += 1
                    pending.append((path, node))
                    done[t] += 1
        # Each tree's first selection of a round never collides, so every round makes progress.
        if pending:
            values = _evaluate_and_expand(game, evaluator, [leaf for _, leaf in pending], config)
            for (path, leaf), value in zip(pending, values):
                if leaf.proven is not None:  # its look-ahead proved it: back up the exact value
                    value = leaf.proven
                _backup(path, leaf.to_play, float(value), vl, config.solver)
    return [root.result(config) for root in roots]


def search(
    game: Game, states: list, evaluator: Evaluator, config: MCTSConfig, rng: np.random.Generator, *, add_noise: bool
) -> list[np.ndarray]:
    """Search every (non-terminal) state; returns the root visit counts, shape (A,) each."""
    return [r.visits for r in search_roots(game, states, evaluator, config, rng, add_noise=add_noise)]


def choose_action(visits: np.ndarray, rng: np.random.Generator, *, temperature: float) -> int:
    """Temperature 1: sample in proportion to visits; 0: the most visited (lowest index on a tie)."""
    if temperature <= 0:
        return int(np.argmax(visits))
    weights = visits ** (1.0 / temperature)
    return int(rng.choice(len(visits), p=weights / weights.sum()))
