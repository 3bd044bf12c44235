"""Self-play strength against exact solutions: solvers, the search's proven values, Gumbel's schedule, and the
shipped networks through a model server on the fixed reference sets (bench/reference/).

The strength floors sit just under what bench/bench_selfplay_strength.py measured on the same positions.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from bench.selfplay_reference import (DotsBoxesSolver, build, connect4_move_outcomes, connect4_threats, load,
                                      mcts_choices, play_moves, position_key, reference_path, score_choices)
from gpu_worker.config import ModelConfig
from pi0_reward_server.client_pool import ClientPool
from pi0_reward_server.kinds.selfplay.games import ConnectFour, make_game
from pi0_reward_server.kinds.selfplay.mcts import MCTSConfig, UniformEvaluator, considered_visits, search_roots
from pi0_reward_server.kinds.selfplay.play import PolicyEvaluator
from pi0_reward_server.policies import PoolPolicy

sys.path.insert(0, "tests")
from test_selfplay_games import solve  # noqa: E402  the slow, obviously-correct solver on the game's own API

SHIPPED = (ModelConfig.parse("connect4=gpu_worker.models.selfplay_net:Connect4Net"),
           ModelConfig.parse("dots_boxes_3x3=gpu_worker.models.selfplay_net:DotsBoxes3x3Net"))
MODEL = {"connect4": "connect4", "dots_boxes": "dots_boxes_3x3"}


def random_state(game, rng, plies):
    state = game.initial_state()
    for _ in range(plies):
        if game.terminal(state):
            break
        state = game.next_state(state, int(rng.choice(np.flatnonzero(game.legal_mask(state)))))
    return state


# -- the reference solvers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("rows, cols", [(1, 2), (2, 2)])
def test_dots_boxes_solver_agrees_with_exhaustive_search(rows, cols):
    game = make_game("dots_boxes", rows, cols)
    _, child_value = solve(game)
    solver = DotsBoxesSolver(game)
    rng = np.random.default_rng(5)
    for _ in range(60):
        state = random_state(game, rng, int(rng.integers(0, game.num_actions - 1)))
        expected = {int(a): child_value(state, a) for a in np.flatnonzero(game.legal_mask(state))}
        assert solver.move_outcomes(state) == expected


@pytest.mark.parametrize("name", ["connect4", "dots_boxes"])
def test_committed_reference_sets_match_the_live_solvers(name):
    """A handful of each committed set re-solved now: BitBully for Connect Four (skipped without it), our own
    solver for Dots and Boxes (always)."""
    if name == "connect4":
        pytest.importorskip("bitbully", reason="bash scripts/install_selfplay_reference.sh installs it")
    game, positions = load(name)
    assert len(positions) >= 100
    solver = DotsBoxesSolver(game) if name == "dots_boxes" else None
    for p in positions[::40]:
        live = connect4_move_outcomes(p["moves"]) if solver is None else solver.move_outcomes(p["state"])
        assert live == p["outcomes"], p["moves"]
        assert len(set(live.values())) > 1  # only positions where a move can be wrong


@pytest.mark.parametrize("name", ["connect4", "dots_boxes"])
def test_validation_sets_are_disjoint_from_the_benchmark_sets(name):
    """The validation sets (for choosing among checkpoints or search settings) share no position with the
    benchmark sets, not even by another move order; a few are re-solved now (Connect Four only with BitBully)."""
    game, benchmark = load(name)
    _, validation = load(name, "validation")
    assert len(validation) >= 100
    assert reference_path(name) == reference_path(name, "benchmark") != reference_path(name, "validation")
    assert reference_path(name, "validation").name == f"selfplay_reference_{name}_validation.json"
    keys = [position_key(game, p["state"]) for p in validation]
    assert len(set(keys)) == len(keys)
    assert not set(keys) & {position_key(game, p["state"]) for p in benchmark}
    assert not {tuple(p["moves"]) for p in validation} & {tuple(p["moves"]) for p in benchmark}
    try:
        import bitbully  # noqa: F401
    except ImportError:
        bitbully = None
    if name == "dots_boxes" or bitbully is not None:
        solver = DotsBoxesSolver(game) if name == "dots_boxes" else None
        for p in validation[::80]:
            live = connect4_move_outcomes(p["moves"]) if solver is None else solver.move_outcomes(p["state"])
            assert live == p["outcomes"] and len(set(live.values())) > 1, p["moves"]


def test_a_set_built_with_exclusions_skips_those_positions_and_their_transpositions():
    """``exclude`` drops positions before solving, so the same seed then yields the next positions it would
    have kept; exclusion is by position, so another move order to an excluded position is dropped too."""
    _, benchmark = load("dots_boxes")
    skipped = build("dots_boxes", 3, 2026, exclude=[p["moves"] for p in benchmark[:2]])["positions"]
    assert [p["moves"] for p in skipped] == [p["moves"] for p in benchmark[2:5]]
    game = ConnectFour()
    assert position_key(game, play_moves(game, [0, 1, 2, 3])) == position_key(game, play_moves(game, [2, 1, 0, 3]))
    assert position_key(game, play_moves(game, [0, 1, 2, 3])) != position_key(game, play_moves(game, [0, 1, 3, 2]))


@pytest.mark.parametrize("bad", ["", "val-idation", "../benchmark", "a b", "validation.json", None])
def test_a_bad_reference_set_name_is_refused_clearly(bad):
    with pytest.raises(ValueError, match="letters, digits and underscores"):
        load("connect4", bad)
    with pytest.raises(ValueError, match="letters, digits and underscores"):
        reference_path("dots_boxes", bad)


def test_a_missing_reference_set_says_how_to_make_it():
    with pytest.raises(FileNotFoundError, match="--set nosuch"):
        load("connect4", "nosuch")


def test_the_dots_and_boxes_reference_check_runs_without_bitbully(tmp_path):
    """With bitbully unimportable only the Connect Four half of the check above skips."""
    import os
    import pathlib
    import subprocess

    here = pathlib.Path(__file__).resolve()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import sys, pytest; sys.modules['bitbully'] = None; sys.exit(pytest.main(sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", code, "-q", "-p", "no:cacheprovider", "-k",
                             "committed_reference_sets", str(here)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "1 passed, 1 skipped" in result.stdout, result.stdout[-2000:]


def test_connect_four_rules_agree_with_bitbully():
    """Random games: the same legal moves, wins and draws as BitBully's board."""
    bitbully = pytest.importorskip("bitbully", reason="bash scripts/install_selfplay_reference.sh installs it")
    game = ConnectFour()
    rng = np.random.default_rng(3)
    for _ in range(40):
        state, board = game.initial_state(), bitbully.Board()
        while not game.terminal(state):
            assert sorted(np.flatnonzero(game.legal_mask(state)).tolist()) == sorted(board.legal_moves())
            move = int(rng.choice(np.flatnonzero(game.legal_mask(state))))
            state = game.next_state(state, move)
            board.play(move)
            assert (state.winner >= 0) == board.has_win()
        assert board.is_game_over()


# -- immediate wins and forced blocks -----------------------------------------------------------------------
@pytest.mark.parametrize("config", [MCTSConfig(simulations=8), MCTSConfig(simulations=400)],
                         ids=["default@8", "default@400"])
def test_immediate_wins_and_forced_blocks_are_always_found_without_knowledge(config):
    """With decisive moves and the solver, even a knowledge-free search never misses one, in any of the set."""
    game, positions = load("connect4")
    tactical = [p for p in positions if p["tags"]]
    assert len(tactical) >= 100
    choices = mcts_choices(game, tactical, UniformEvaluator(), config)
    assert score_choices(tactical, choices)["tactical"] == 1.0


def test_an_immediate_win_proves_the_root_at_once():
    game = ConnectFour()
    state = play_moves(game, [0, 6, 1, 6, 2, 5])  # player 0 has 0, 1, 2 on the bottom row
    result = search_roots(game, [state], UniformEvaluator(), MCTSConfig(simulations=64), np.random.default_rng(0),
                          add_noise=True)[0]
    assert result.action == 3 and result.proven == 1.0 and result.value == 1.0
    assert result.policy[3] == 1.0


def test_the_search_value_is_the_roots_backed_up_mean_for_its_mover():
    """A root facing an immediate threat, 8 simulations: the evaluator says 0 everywhere, but the moves other
    than the block lose at once (-1 for the mover each), so the mean of the root's own value and its 8 backed-up
    values is negative, and above -1 since the block does not lose."""
    game = ConnectFour()
    state = play_moves(game, [6, 0, 6, 1, 5, 2])
    result = search_roots(game, [state], UniformEvaluator(), MCTSConfig(simulations=8), np.random.default_rng(0),
                          add_noise=False)[0]
    assert result.proven is None and result.visits.sum() == 8
    assert -1.0 < result.value < 0.0


def test_a_forced_block_is_found_and_other_moves_proven_lost():
    game = ConnectFour()
    state = play_moves(game, [6, 0, 6, 1, 5, 2])  # player 1 threatens column 3; player 0 to move
    assert connect4_threats(game, state) == {3}
    for selection in ("puct", "gumbel"):
        result = search_roots(game, [state], UniformEvaluator(), MCTSConfig(simulations=64, selection=selection),
                              np.random.default_rng(0), add_noise=False)[0]
        assert result.action == 3, selection


@pytest.mark.parametrize("selection", ["puct", "gumbel"])
def test_moves_proven_lost_get_no_policy_mass(selection):
    """The policy is sampled from in the opening moves and is the training target: a move the search has proven
    to lose (here every move but the block, each of which lets column 3 win at once) gets none of it."""
    game = ConnectFour()
    state = play_moves(game, [6, 0, 6, 1, 5, 2])
    for move in set(range(7)) - {3}:
        assert game.next_state(game.next_state(state, move), 3).winner == 1
    result = search_roots(game, [state], UniformEvaluator(), MCTSConfig(simulations=32, selection=selection),
                          np.random.default_rng(0), add_noise=True)[0]
    assert result.proven is None and result.visits[[a for a in range(7) if a != 3]].sum() > 0
    assert result.policy[3] == 1.0 and result.action == 3


# -- MCTS-Solver ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("selection", ["puct", "gumbel"])
def test_solver_proves_tiny_dots_and_boxes_exactly(selection):
    """Small enough to prove: the root's proven value and move match the exhaustive solver, also where a
    completed box gives the same player another move (the proof must not flip sides there)."""
    game = make_game("dots_boxes", 2, 2)
    value, child_value = solve(game)
    rng = np.random.default_rng(11)
    proven = 0
    for _ in range(40):
        state = random_state(game, rng, int(rng.integers(5, 9)))
        if game.terminal(state):
            continue
        result = search_roots(game, [state], UniformEvaluator(),
                              MCTSConfig(simulations=3000, leaves_per_round=4, selection=selection),
                              np.random.default_rng(0), add_noise=False)[0]
        if result.proven is None:
            continue
        scores = state.scores
        lead = scores[state.to_play] - scores[1 - state.to_play]
        assert result.proven == value(tuple(state.edges), scores, state.to_play), (state.edges.tolist(), lead)
        assert child_value(state, result.action) == result.proven
        proven += 1
    assert proven >= 20


# -- Gumbel root: sequential halving ------------------------------------------------------------------------
def test_considered_visits_is_sequential_halving():
    schedule = considered_visits(4, 16)
    # 4 moves x 2 visits, then the best 2 x 4 more visits: mctx's table for (4, 16).
    assert schedule == (0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5)
    assert considered_visits(1, 5) == (0, 1, 2, 3, 4)
    assert len(considered_visits(16, 400)) == 400


@pytest.mark.parametrize("selection", ["puct", "gumbel"])
@pytest.mark.parametrize("game_name, leaves", [("connect4", 32), ("dots_boxes", 64)])
def test_every_requested_simulation_is_run_with_each_selection(selection, game_name, leaves):
    game = make_game(game_name)
    config = MCTSConfig(simulations=2 * leaves, leaves_per_round=leaves, selection=selection)
    result = search_roots(game, [game.initial_state()], UniformEvaluator(), config, np.random.default_rng(0),
                          add_noise=True)[0]
    assert result.visits.sum() == 2 * leaves
    assert abs(result.policy.sum() - 1.0) < 1e-9 and (result.policy[~game.legal_mask(game.initial_state())] == 0).all()


def test_gumbel_root_visits_the_considered_moves_by_halving():
    game = make_game("connect4")
    config = MCTSConfig(simulations=64, leaves_per_round=1, selection="gumbel", max_considered=4)
    result = search_roots(game, [game.initial_state()], UniformEvaluator(), config, np.random.default_rng(2),
                          add_noise=True)[0]
    visited = np.sort(result.visits[result.visits > 0])[::-1]
    assert len(visited) == 4  # only the 4 sampled moves
    assert visited[0] >= visited[1] > visited[2] == visited[3]  # two survived the first halving
    assert result.visits[result.action] == visited[0]


# -- the shipped networks, through a model server ----------------------------------------------------------
# `python bench/bench_selfplay_strength.py --positions 60 --players net@400` measured 56/60 (93.3%) for Dots and
# Boxes and 57/60 (95.0%) for Connect Four; each floor allows one more miss.
STRENGTH_FLOORS = {  # game: (positions, simulations, floor for the share of optimal moves)
    "dots_boxes": (60, 400, 0.91),
    "connect4": (60, 400, 0.93),
}


@pytest.mark.slow
@pytest.mark.parametrize("game_name", ["dots_boxes", "connect4"])
def test_shipped_network_with_search_is_near_optimal(start_server, game_name):
    positions_n, simulations, floor = STRENGTH_FLOORS[game_name]
    server = start_server(models=SHIPPED, log_level="WARNING", max_queue=65536)
    game, positions = load(game_name)
    positions = positions[:positions_n]
    with ClientPool([server.url]).start(wait_s=10) as pool:
        network = PolicyEvaluator(PoolPolicy(pool, MODEL[game_name]))
        choices = mcts_choices(game, positions, network, MCTSConfig(simulations=simulations))
        assert network.calls > 0
    figures = score_choices(positions, choices)
    assert figures["optimal"] >= floor, {k: v for k, v in figures.items() if k != "failures"}
    assert figures["tactical"] == 1.0


# -- the scripts, end to end with tiny settings (their figures are not checked) -----------------------------
@pytest.mark.slow
def test_strength_benchmark_and_training_script_run(tmp_path):
    import json
    import os
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    bench_out = tmp_path / "strength.json"
    subprocess.run([sys.executable, str(root / "bench" / "bench_selfplay_strength.py"), "--positions", "4",
                    "--players", "network,net@8,uniform@8", "--search", "default,puct", "--out", str(bench_out)],
                   check=True, env=env, cwd=root, capture_output=True, timeout=240)
    figures = json.loads(bench_out.read_text())["games"]
    assert set(figures) == {"dots_boxes", "connect4"}
    assert {"network", "mcts+net@8 [default]", "mcts+uniform@8 [puct]"} <= set(figures["connect4"])
    assert all(r["positions"] == 4 for rows in figures.values() for r in rows.values())

    summary_path, checkpoint = tmp_path / "training.json", tmp_path / "net.pt"
    subprocess.run([sys.executable, str(root / "scripts" / "train_selfplay.py"), "--game", "dots_boxes",
                    "--iterations", "1", "--games", "2", "--simulations", "4", "--random-plies", "6",
                    "--value-target", "mixed",
                    "--eval-games", "2", "--eval-simulations", "4", "--out", str(checkpoint),
                    "--results", str(summary_path)], check=True, env=env, cwd=root, capture_output=True, timeout=240)
    summary = json.loads(summary_path.read_text())
    assert summary["games"] == 2 and summary["iterations"] == 1 and checkpoint.is_file()
    assert summary["value_target"] == "mixed"
    assert summary["previous"] == "gpu_worker/checkpoints/dots_boxes_3x3.pt"
    assert summary["eval"]["vs_previous"]["wins"] + summary["eval"]["vs_previous"]["draws"] + \
        summary["eval"]["vs_previous"]["losses"] == 2


@pytest.mark.slow
def test_training_script_splits_games_over_actor_processes_and_keeps_snapshots(tmp_path):
    import json
    import os
    import pathlib
    import subprocess

    import torch

    root = pathlib.Path(__file__).resolve().parents[1]
    summary_path, checkpoint = tmp_path / "training.json", tmp_path / "net.pt"
    subprocess.run([sys.executable, str(root / "scripts" / "train_selfplay.py"), "--game", "connect4",
                    "--iterations", "2", "--games", "3", "--actors", "2", "--simulations", "4", "--random-plies", "6",
                    "--snapshot-every", "1", "--eval-games", "2", "--eval-simulations", "4", "--out", str(checkpoint),
                    "--results", str(summary_path)], check=True, env={**os.environ, "PYTHONPATH": str(root)},
                   cwd=root, capture_output=True, timeout=240)
    summary = json.loads(summary_path.read_text())
    assert summary["actors"] == 2 and summary["iterations"] == 2
    assert summary["server_threads"] == max(1, os.cpu_count() - 2)
    assert [h["games"] for h in summary["history"]] == [3, 3] and summary["games"] == 6  # 2 + 1 per iteration
    assert summary["positions"] == sum(h["new_positions"] for h in summary["history"]) > 6
    snapshots = [tmp_path / "net.iter1.pt", tmp_path / "net.iter2.pt"]
    assert all(path.is_file() for path in snapshots) and checkpoint.is_file()
    last, final = (torch.load(path, weights_only=True) for path in (snapshots[1], checkpoint))
    assert all(torch.equal(last[name], final[name]) for name in final)  # the last snapshot is the result
    first = torch.load(snapshots[0], weights_only=True)
    assert not all(torch.equal(first[name], final[name]) for name in final)  # the second iteration trained


def test_training_script_refuses_bad_flags(tmp_path):
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    for flags, message in ((["--eval-games", "3"], "--eval-games must be even"),
                           (["--random-plies", "-1"], "--random-plies must be >= 0"),
                           (["--init", str(tmp_path / "missing.pt")], "--init: no checkpoint at"),
                           (["--value-target", "search"], "--value-target: invalid choice"),
                           (["--actors", "0"], "--actors must be at least 1"),
                           (["--snapshot-every", "-1"], "--snapshot-every must be >= 0"),
                           (["--server-threads", "0"], "--server-threads must be at least 1")):
        result = subprocess.run([sys.executable, str(root / "scripts" / "train_selfplay.py"), "--game", "connect4",
                                 *flags], cwd=root, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_value_targets_are_the_outcome_or_its_mean_with_the_search_value():
    import importlib.util
    import pathlib

    from pi0_reward_server.kinds.selfplay.play import GameResult

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "train_selfplay.py"
    spec = importlib.util.spec_from_file_location("train_selfplay", path)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    results = [GameResult(1.0, [0, 1, 2], players=[0, 1, 0], values=[0.5, -1.0, 0.0]),
               GameResult(0.0, [3], players=[1], values=[0.25])]
    assert train.value_targets(results, "outcome").tolist() == [1.0, -1.0, 1.0, 0.0]
    assert train.value_targets(results, "mixed").tolist() == [0.75, -1.0, 0.5, 0.125]


# -- the optional BitBully install ----------------------------------------------------------------------------
def _scripts_copy(tmp_path, pip_exit: int):
    """A copy of scripts/ whose .venv python records pip's arguments (exiting ``pip_exit``) and runs the rest."""
    import pathlib
    import shutil

    root = pathlib.Path(__file__).resolve().parents[1]
    shutil.copytree(root / "scripts", tmp_path / "scripts")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    python = tmp_path / ".venv" / "bin" / "python"
    python.write_text(f"""#!/usr/bin/env bash
if [ "$1 $2" = "-m pip" ]; then echo "${{@:3}}" >> {tmp_path}/pip-args; exit {pip_exit}; fi
if [ "$1 $2" = "-m pytest" ]; then echo "pytest ran"; exit 0; fi
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    return tmp_path


def test_the_reference_install_takes_its_pin_from_pyproject(tmp_path):
    import subprocess

    copy = _scripts_copy(tmp_path, pip_exit=0)
    (copy / "pyproject.toml").write_text('[project]\nname = "x"\n[project.optional-dependencies]\n'
                                         'selfplay-reference = ["bitbully==9.9.9"]\n')
    subprocess.run(["bash", "scripts/install_selfplay_reference.sh"], cwd=copy, check=True, capture_output=True,
                   timeout=60)
    assert (copy / "pip-args").read_text().split() == ["install", "-q", "bitbully==9.9.9"]


def test_a_failed_reference_install_does_not_stop_the_test_run(tmp_path):
    """scripts/test.sh: the tests that need BitBully skip without it, so its failed install only warns."""
    import subprocess

    copy = _scripts_copy(tmp_path, pip_exit=1)
    for script in (copy / "scripts").glob("install*.sh"):
        if script.name != "install_selfplay_reference.sh":
            script.write_text("exit 0\n")
    (copy / "pyproject.toml").write_text('[project]\nname = "x"\n[project.optional-dependencies]\n'
                                         'selfplay-reference = ["bitbully==0.0.79"]\n')
    result = subprocess.run(["bash", "scripts/test.sh"], cwd=copy, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "pytest ran" in result.stdout, result.stderr
    assert "the self-play tests that need BitBully will be skipped" in result.stderr


def test_the_tests_import_bench_without_pythonpath(tmp_path):
    """pyproject's pytest settings put the repository root on sys.path, so plain `pytest` from anywhere imports
    bench.selfplay_reference as this file does."""
    import os
    import pathlib
    import subprocess

    here = pathlib.Path(__file__).resolve()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", "import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))",
                             "--collect-only", "-q", "-p", "no:cacheprovider", str(here)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]
