"""Exact reference positions for measuring self-play strength (tests and benchmarks only, never the product).

A reference position is a move list from the empty board plus the exact
outcome (+1 win, 0 draw, -1 loss, for the player to move) of every legal move.
A move is *optimal* when its outcome equals the best one; only positions where
the moves' outcomes differ are kept, so picking at random can be wrong.

- Dots and Boxes 3x3: :class:`DotsBoxesSolver`, an exhaustive memoised search
  over the lines still open (positions with 8-14 lines left: at most 2^14
  sub-positions each), on bit masks rather than the game's arrays.
- Connect Four 6x7: BitBully (PyPI ``bitbully``, AGPL-3.0, with its MIT
  opening books ``bitbully-databases``), a perfect solver. It is installed by
  ``scripts/install_selfplay_reference.sh`` for tests and benchmarks only and
  imported lazily here; the product never imports it.

``bench/reference/selfplay_reference_<game>.json`` holds the fixed ``benchmark``
sets, made by ``python bench/selfplay_reference.py`` (seeded); tests re-check
some of them against the live solvers. Other named sets sit beside them as
``selfplay_reference_<game>_<set>.json`` (``--set validation --seed 7``: the
``validation`` sets, for choosing among checkpoints or search settings without
tuning to the benchmark); every such set is built disjoint from its game's
benchmark set, by position (a transposition of a benchmark position is left
out too).

Tags: ``win_now`` (some move wins at once) and ``block_now`` (none does, and
the opponent would win at once at a column the mover can fill: Connect Four
only); these positions must never be missed.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import re
import sys
from collections.abc import Iterable, Sequence

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from pi0_reward_server.kinds.selfplay.games import ConnectFour, DotsAndBoxes, make_game  # noqa: E402

DATA = ROOT / "bench" / "reference"
DOTS_LINES_LEFT = (8, 14)  # inclusive: few enough lines left for an exhaustive solve
CONNECT4_PLIES = (8, 20)  # inclusive: random plies from the empty board
MAX_FAILURES_KEPT = 10  # failures written with the figures, for study
BENCHMARK = "benchmark"  # the fixed set every figure so far was measured on; its files carry no set suffix
SET_NAME = re.compile(r"[A-Za-z0-9_]+")


# -- Dots and Boxes -----------------------------------------------------------------------------------
class DotsBoxesSolver:
    """Exact Dots and Boxes: the best net boxes the player to move can still gain, memoised on open lines.

    The net gain from a set of drawn lines does not depend on who owns the
    boxes already taken, so one table serves every score; the outcome of a
    move is then ``sign(lead + boxes it takes +/- gain of the position after)``.
    """

    def __init__(self, game: DotsAndBoxes) -> None:
        self.game = game
        self.full = (1 << game.num_actions) - 1
        # For each line: the masks of the (one or two) boxes it borders.
        self.box_masks = [[sum(1 << int(e) for e in game.box_edges[b]) for b in game.edge_boxes[a]]
                          for a in range(game.num_actions)]
        self._gain = functools.lru_cache(maxsize=None)(self._gain_uncached)

    def _completed(self, drawn: int, action: int) -> int:
        after = drawn | (1 << action)
        return sum(1 for mask in self.box_masks[action] if after & mask == mask)

    def _gain_uncached(self, drawn: int) -> int:
        if drawn == self.full:
            return 0
        best = -99
        open_lines = self.full & ~drawn
        while open_lines:
            low = open_lines & -open_lines
            action = low.bit_length() - 1
            open_lines ^= low
            took = self._completed(drawn, action)
            after = self._gain(drawn | low)
            best = max(best, took + after if took else took - after)
        return best

    def move_outcomes(self, state) -> dict[int, int]:
        """{legal move: exact outcome for the player to move (+1 / 0 / -1)}."""
        drawn = sum(1 << int(a) for a in np.flatnonzero(state.edges))
        lead = state.scores[state.to_play] - state.scores[1 - state.to_play]
        outcomes = {}
        for action in np.flatnonzero(~state.edges):
            action = int(action)
            took = self._completed(drawn, action)
            after = self._gain(drawn | (1 << action))
            outcomes[action] = int(np.sign(lead + (took + after if took else took - after)))
        return outcomes


# -- Connect Four ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _bitbully():
    try:
        from bitbully import BitBully
    except ImportError:
        raise RuntimeError("the Connect Four reference needs bitbully: bash scripts/install_selfplay_reference.sh") from None
    return BitBully()


def connect4_move_outcomes(moves: list[int]) -> dict[int, int]:
    """{legal column: exact outcome for the player to move}, by BitBully (score > 0 wins, 0 draws, < 0 loses)."""
    from bitbully import Board

    scores = _bitbully().score_all_moves(Board.from_moves(list(moves)))
    return {int(col): int(np.sign(score)) for col, score in scores.items()}


def connect4_threats(game: ConnectFour, state) -> set[int]:
    """Columns where the opponent of the player to move would win at once if it were their turn."""
    from pi0_reward_server.kinds.selfplay.games import C4State

    swapped = C4State(state.board, state.heights, 1 - state.to_play, -1, state.moves)
    threats = set()
    for col in np.flatnonzero(game.legal_mask(swapped)):
        if game.next_state(swapped, int(col)).winner >= 0:
            threats.add(int(col))
    return threats


# -- building and loading the sets -----------------------------------------------------------------------
def play_moves(game, moves: list[int]):
    state = game.initial_state()
    for move in moves:
        state = game.next_state(state, int(move))
    return state


def tags_for(game, state) -> list[str]:
    wins_now = [a for a in np.flatnonzero(game.legal_mask(state))
                if game.terminal(child := game.next_state(state, int(a)))
                and game.outcome(child) == (1.0 if state.to_play == 0 else -1.0)]
    if wins_now:
        return ["win_now"]
    if isinstance(game, ConnectFour) and connect4_threats(game, state):
        return ["block_now"]
    return []


def exact_outcomes(game, state, moves: list[int], solver: DotsBoxesSolver | None = None) -> dict[int, int]:
    if isinstance(game, ConnectFour):
        return connect4_move_outcomes(moves)
    return (solver or DotsBoxesSolver(game)).move_outcomes(state)


def position_key(game, state) -> bytes:
    """The position itself (what the network sees), so two move orders reaching it give the same key."""
    return game.encode(state).tobytes()


def build(game_name: str, count: int, seed: int, exclude: Iterable[Sequence[int]] = ()) -> dict:
    """``count`` random positions of the kind named in the module docstring whose moves' outcomes differ.

    No position is kept twice, nor any position reached by a move list in ``exclude`` (another set's, so the
    two are disjoint by construction; transpositions included).
    """
    game = make_game(game_name)
    rng = np.random.default_rng(seed)
    solver = DotsBoxesSolver(game) if isinstance(game, DotsAndBoxes) else None
    excluded = {position_key(game, play_moves(game, moves)) for moves in exclude}
    positions, seen = [], set()
    while len(positions) < count:
        if solver is not None:
            plies = game.num_actions - int(rng.integers(DOTS_LINES_LEFT[0], DOTS_LINES_LEFT[1] + 1))
        else:
            plies = int(rng.integers(CONNECT4_PLIES[0], CONNECT4_PLIES[1] + 1))
        state, moves = game.initial_state(), []
        for _ in range(plies):
            if game.terminal(state):
                break
            moves.append(int(rng.choice(np.flatnonzero(game.legal_mask(state)))))
            state = game.next_state(state, moves[-1])
        if game.terminal(state) or (key := position_key(game, state)) in seen or key in excluded:
            continue
        outcomes = exact_outcomes(game, state, moves, solver)
        if len(set(outcomes.values())) < 2:
            continue
        seen.add(key)
        positions.append({"moves": moves, "outcomes": {str(a): o for a, o in sorted(outcomes.items())},
                          "tags": tags_for(game, state)})
    return {"game": game.name, "seed": seed, "positions": positions}


def check_set_name(set_name: str) -> str:
    if not isinstance(set_name, str) or not SET_NAME.fullmatch(set_name):
        raise ValueError(f"reference set name must be letters, digits and underscores (e.g. {BENCHMARK!r} or "
                         f"'validation'), got {set_name!r}")
    return set_name


def reference_path(game_name: str, set_name: str = BENCHMARK) -> pathlib.Path:
    """``selfplay_reference_<game>.json`` for the benchmark set, ``selfplay_reference_<game>_<set>.json`` else."""
    suffix = "" if check_set_name(set_name) == BENCHMARK else f"_{set_name}"
    return DATA / f"selfplay_reference_{game_name}{suffix}.json"


def load(game_name: str, set_name: str = BENCHMARK) -> tuple[object, list[dict]]:
    """(game, positions) from the committed set; each position gains ``state`` and ``optimal`` (a set of moves)."""
    path = reference_path(game_name, set_name)
    if not path.is_file():
        raise FileNotFoundError(f"no {set_name!r} reference set for {game_name!r} ({path.relative_to(ROOT)}); make it "
                                f"with python bench/selfplay_reference.py --games {game_name} --set {set_name}")
    data = json.loads(path.read_text())
    game = make_game(game_name)
    positions = []
    for p in data["positions"]:
        outcomes = {int(a): o for a, o in p["outcomes"].items()}
        best = max(outcomes.values())
        positions.append({**p, "outcomes": outcomes, "state": play_moves(game, p["moves"]),
                          "optimal": {a for a, o in outcomes.items() if o == best}})
    return game, positions


# -- measuring a player against a set ------------------------------------------------------------------------
def score_choices(positions: list[dict], choices: list[int]) -> dict:
    """Fractions of positions where the chosen move is optimal: all, and the ``win_now``/``block_now`` ones."""
    hits = [c in p["optimal"] for p, c in zip(positions, choices)]
    tactical = [h for p, h in zip(positions, hits) if p["tags"]]
    failures = [{"moves": p["moves"], "chose": int(c), "outcomes": p["outcomes"]}
                for p, c, h in zip(positions, choices, hits) if not h]
    return {"positions": len(hits), "optimal": float(np.mean(hits)) if hits else 0.0,
            "tactical_positions": len(tactical), "tactical": float(np.mean(tactical)) if tactical else 1.0,
            "failed": len(failures), "failures": failures[:MAX_FAILURES_KEPT]}


def network_choices(game, positions: list[dict], evaluator) -> list[int]:
    """The raw policy's choice: the legal move with the highest prior."""
    observations = np.stack([game.encode(p["state"]) for p in positions])
    legal = np.stack([game.legal_mask(p["state"]) for p in positions])
    priors, _ = evaluator.evaluate(observations, legal)
    return [int(np.argmax(np.where(m, pr, -1.0))) for pr, m in zip(priors, legal)]


def mcts_choices(game, positions: list[dict], evaluator, config, *, seed: int = 0) -> list[int]:
    """The search's choice (no root noise), all positions searched together as the product does."""
    from pi0_reward_server.kinds.selfplay.mcts import search_roots

    rng = np.random.default_rng(seed)
    return [r.action for r in search_roots(game, [p["state"] for p in positions], evaluator, config, rng,
                                           add_noise=False)]


def main() -> int:
    parser = argparse.ArgumentParser(description="Write the fixed exact reference sets under bench/reference/.")
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--games", default="dots_boxes,connect4")
    parser.add_argument("--set", default=BENCHMARK, dest="set_name", metavar="NAME",
                        help=f"{BENCHMARK!r} (default) writes selfplay_reference_<game>.json; any other name "
                             f"(letters, digits, underscores) selfplay_reference_<game>_<NAME>.json, disjoint from "
                             f"the benchmark set; use a seed other than the benchmark's")
    args = parser.parse_args()
    try:
        check_set_name(args.set_name)
    except ValueError as e:
        parser.error(f"--set: {e}")
    DATA.mkdir(parents=True, exist_ok=True)
    for name in args.games.split(","):
        exclude = []
        if args.set_name != BENCHMARK:
            benchmark = reference_path(name)
            if not benchmark.is_file():
                parser.error(f"--set {args.set_name}: the benchmark set {benchmark.relative_to(ROOT)} must exist "
                             f"first, to be kept out of it")
            exclude = [p["moves"] for p in json.loads(benchmark.read_text())["positions"]]
        data = build(name, args.count, args.seed, exclude)
        if args.set_name != BENCHMARK:
            data = {"game": data["game"], "set": args.set_name, "seed": args.seed, "disjoint_from": BENCHMARK,
                    "positions": data["positions"]}
        path = reference_path(name, args.set_name)
        path.write_text(json.dumps(data, separators=(",", ":")) + "\n")
        tags = [t for p in data["positions"] for t in p["tags"]]
        print(f"{path.name}: {len(data['positions'])} positions, {tags.count('win_now')} win_now, "
              f"{tags.count('block_now')} block_now, {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
