"""Game rules and MCTS correctness: box completion keeps the turn, Connect Four lines, optimal play on tiny boards."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from pi0_reward_server.kinds.selfplay.games import C4State, ConnectFour, DotsAndBoxes, make_game
from pi0_reward_server.kinds.selfplay.mcts import MCTSConfig, UniformEvaluator, search, search_roots


def play(game, moves, state=None):
    state = state or game.initial_state()
    for move in moves:
        state = game.next_state(state, move)
    return state


# -- Dots and Boxes --------------------------------------------------------------------------------
def test_completing_a_box_scores_and_keeps_the_turn():
    game = DotsAndBoxes(1, 2)  # edges: horizontal 0-3 (top 0,1; bottom 2,3), vertical 4,5,6
    state = play(game, [0, 2, 4])  # box 0 has three sides; players alternate: 0, 1, 0
    assert state.to_play == 1 and state.scores == (0, 0)
    state = game.next_state(state, 5)  # player 1 closes box 0 (its right side is edge 5)
    assert state.scores == (0, 1) and state.to_play == 1  # and moves again
    assert state.owners[0, 0] == 2
    state = game.next_state(state, 1)  # no box: the turn passes
    assert state.to_play == 0


def test_one_edge_can_complete_two_boxes():
    game = DotsAndBoxes(1, 2)
    state = play(game, [0, 1, 2, 3, 4, 6])  # everything but the middle vertical edge
    mover = state.to_play
    state = game.next_state(state, 5)
    assert state.scores[mover] == 2 and game.terminal(state)
    assert game.outcome(state) == (1.0 if mover == 0 else -1.0)


def test_dots_and_boxes_terminal_and_illegal_moves():
    game = DotsAndBoxes(2, 2)
    state = game.initial_state()
    with pytest.raises(ValueError, match="illegal move"):
        game.next_state(game.next_state(state, 0), 0)
    for edge in range(game.num_actions):
        state = game.next_state(state, edge)
    assert game.terminal(state) and not game.legal_mask(state).any()
    assert sum(state.scores) == 4
    assert game.encode(state).shape == (game.obs_dim,)


# -- Connect Four ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "moves, direction",
    [
        ([0, 0, 1, 1, 2, 2, 3], "horizontal"),
        ([0, 1, 0, 1, 0, 1, 0], "vertical"),
        ([0, 1, 1, 2, 2, 3, 2, 3, 3, 6, 3], "diagonal /"),
        ([6, 5, 5, 4, 4, 3, 4, 3, 3, 0, 3], "diagonal \\"),
    ],
)
def test_connect_four_wins_in_all_directions(moves, direction):
    game = ConnectFour()
    state = play(game, moves[:-1])
    assert not game.terminal(state), direction
    state = game.next_state(state, moves[-1])
    assert game.terminal(state) and state.winner == 0 and game.outcome(state) == 1.0, direction
    assert not game.legal_mask(state).any()
    with pytest.raises(ValueError):
        game.next_state(state, 5)


def test_connect_four_full_board_is_a_draw():
    game = ConnectFour(4, 4)
    pattern = np.array([[1, 1, 2, 2], [2, 2, 1, 1], [1, 1, 2, 2], [2, 2, 1, 1]], np.int8)  # no line of four
    state = C4State(pattern, np.full(4, 4, np.int8), 0, -1, 16)
    assert game.terminal(state) and game.outcome(state) == 0.0 and not game.legal_mask(state).any()
    with pytest.raises(ValueError, match="4-12 rows"):
        ConnectFour(3, 7)


def test_encoding_is_from_the_movers_view():
    game = ConnectFour()
    state = play(game, [3])
    mine, theirs = game.encode(state).reshape(2, 6, 7)
    assert theirs[0, 3] == 1 and mine.sum() == 0  # player 1 to move: player 0's piece is "theirs"


# -- MCTS --------------------------------------------------------------------------------------------
PUCT = dict(selection="puct", solver=False, decisive=False, fpu_reduction=None)  # textbook AlphaZero PUCT


def best_moves(game, state, config):
    return search_roots(game, [state], UniformEvaluator(), config, np.random.default_rng(0), add_noise=False)[0].action


def test_mcts_takes_an_immediate_win():
    game = ConnectFour()
    state = play(game, [0, 6, 1, 6, 2, 5])  # player 0 has 0,1,2 on the bottom row
    assert best_moves(game, state, MCTSConfig(simulations=200)) == 3


def test_mcts_blocks_an_immediate_loss():
    game = ConnectFour()
    state = play(game, [6, 0, 6, 1, 5, 2])  # player 1 threatens column 3; player 0 to move
    assert state.to_play == 0
    assert best_moves(game, state, MCTSConfig(simulations=400)) == 3


def solve(game: DotsAndBoxes):
    """Exhaustive game-theoretic value (+1 win, 0 draw, -1 loss) for the player to move."""

    @functools.lru_cache(maxsize=None)
    def value(edges: tuple, scores: tuple, to_play: int) -> int:
        state = _db_state(game, edges, scores, to_play)
        if game.terminal(state):
            return int(np.sign(scores[to_play] - scores[1 - to_play]))
        return max(child_value(state, a) for a in np.flatnonzero(game.legal_mask(state)))

    def child_value(state, action: int) -> int:
        child = game.next_state(state, int(action))
        v = value(tuple(child.edges), child.scores, child.to_play)
        return v if child.to_play == state.to_play else -v

    return value, child_value


def _db_state(game, edges, scores, to_play):
    from pi0_reward_server.kinds.selfplay.games import DBState

    edges = np.array(edges, bool)
    owners = np.zeros((game.rows, game.cols), np.int8)  # ownership does not matter to the value, scores do
    return DBState(edges, owners, scores, to_play)


@pytest.mark.parametrize("rows, cols", [(1, 2), (2, 2)])
def test_mcts_plays_optimally_on_tiny_dots_and_boxes(rows, cols):
    """Positions with at most 5 moves left, where some move is a mistake. (From the empty 1x2
    board, where only the middle edge wins, a value-free MCTS needs tens of thousands of
    simulations before its visit counts single it out: the evaluator knows nothing.)"""
    game = make_game("dots_boxes", rows, cols)
    value, child_value = solve(game)
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(400):
        state = game.initial_state()
        for _ in range(rng.integers(game.num_actions - 5, game.num_actions - 1)):
            state = game.next_state(state, int(rng.choice(np.flatnonzero(game.legal_mask(state)))))
        if game.terminal(state) or game.legal_mask(state).sum() > 5:
            continue
        legal = np.flatnonzero(game.legal_mask(state))
        values = {int(a): child_value(state, a) for a in legal}
        best = max(values.values())
        optimal = {a for a, v in values.items() if v == best}
        if len(optimal) == len(legal):
            continue  # every move is as good: nothing to check
        move = best_moves(game, state, MCTSConfig(simulations=2000, leaves_per_round=1))
        assert move in optimal, (state.edges.astype(int).tolist(), state.scores, values, move)
        checked += 1
        if checked == 12:
            break
    assert checked >= 5  # enough positions where a mistake was possible


def test_virtual_loss_batches_spread_over_different_leaves():
    game = ConnectFour()
    calls = []

    class Counting(UniformEvaluator):
        def evaluate(self, observations, legal):
            calls.append(len(observations))
            return super().evaluate(observations, legal)

    states = [game.initial_state()] * 3
    visits = search(game, states, Counting(), MCTSConfig(simulations=16, leaves_per_round=8, **PUCT),
                    np.random.default_rng(0), add_noise=False)
    assert calls[0] == 3  # the three roots, in one call
    # Round 1: 8 selections per tree reach its 7 distinct children (the 8th would repeat one): 21 leaves.
    # Round 2: the children are expanded, so all 8 selections find distinct grandchildren: 24.
    # Round 3: the one simulation the collision did not complete.
    assert calls[1:] == [3 * 7, 3 * 8, 3 * 1]
    assert all(v.sum() == 16 for v in visits)  # collisions are retried: every simulation is done


@pytest.mark.parametrize("game_name, leaves", [("connect4", 32), ("connect4", 64), ("dots_boxes", 32)])
def test_every_requested_simulation_is_run_even_with_wide_rounds(game_name, leaves):
    game = make_game(game_name)
    config = MCTSConfig(simulations=leaves, leaves_per_round=leaves)
    visits = search(game, [game.initial_state()], UniformEvaluator(), config, np.random.default_rng(0), add_noise=False)
    assert visits[0].sum() == leaves


def test_games_can_start_from_given_positions():
    from pi0_reward_server.kinds.selfplay.play import Agent, play_games

    game = ConnectFour()
    start = play(game, [0, 6, 1, 6, 2, 5])  # player 0 wins at once in column 3
    agent = Agent("mcts", UniformEvaluator(), MCTSConfig(simulations=16))
    results = play_games(game, [(agent, agent)] * 2, np.random.default_rng(0), starts=[start, game.initial_state()])
    assert results[0].moves == [3] and results[0].outcome == 1.0
    assert len(results[1].moves) > 1
    with pytest.raises(ValueError, match="starts has 1 states for 2 games"):
        play_games(game, [(agent, agent)] * 2, np.random.default_rng(0), starts=[start])
