"""Self-play through the pool: same games as in-process, /score selfplay end to end, bad specs."""

from __future__ import annotations

import numpy as np
import pytest

from gpu_worker.config import ModelConfig
from gpu_worker.model import load_model
from pi0_reward_server.app import create_app
from pi0_reward_server.client_pool import ClientPool
from pi0_reward_server.policies import LocalPolicy, PoolPolicy
from pi0_reward_server.kinds.selfplay.games import make_game
from pi0_reward_server.kinds.selfplay.mcts import MCTSConfig, UniformEvaluator
from pi0_reward_server.kinds.selfplay.play import Agent, PolicyEvaluator, decode_records, play_games

NET = "gpu_worker.models.selfplay_net:PolicyValueNet"
C4_OPTIONS = {"obs_dim": 84, "num_actions": 7, "hidden": 64}
DB_OPTIONS = {"obs_dim": 43, "num_actions": 24, "hidden": 64}


def nets() -> tuple[ModelConfig, ...]:
    # Untrained networks with fixed seeds' weights stand in for the shipped ones: these tests are about plumbing.
    return (ModelConfig(name="connect4", target=NET, options=C4_OPTIONS),
            ModelConfig(name="dots_boxes_3x3", target=NET, options=DB_OPTIONS))


def seeded_games(policy, seed: int) -> list[list[int]]:
    game = make_game("connect4")
    config = MCTSConfig(simulations=24, leaves_per_round=4)
    ours = Agent("mcts", PolicyEvaluator(policy), config, noise=True)
    theirs = Agent("mcts", UniformEvaluator(), config)
    seats = [(ours, theirs), (theirs, ours), (ours, ours)]
    return [r.moves for r in play_games(game, seats, np.random.default_rng(seed), temperature_moves=4)]


def test_seeded_games_are_identical_through_the_pool_and_in_process(start_server):
    import torch

    torch.manual_seed(3)
    server = start_server(models=(nets()[0],), log_level="WARNING")
    torch.manual_seed(3)  # the same initial weights in this process
    local = load_model(NET, None, device="cpu", options=C4_OPTIONS)
    remote = server.server.models["connect4"].policy
    for a, b in zip(local.state_dict().values(), remote.state_dict().values()):
        assert torch.equal(a, b)
    with ClientPool([server.url]).start(wait_s=10) as pool:
        through_pool = seeded_games(PoolPolicy(pool, "connect4"), seed=11)
    in_process = seeded_games(LocalPolicy({"connect4": local}, "connect4"), seed=11)
    assert through_pool == in_process
    assert len({tuple(m) for m in through_pool}) == 3


@pytest.fixture
def app_with_nets(start_server):
    server = start_server(models=nets(), log_level="WARNING")
    app = create_app({"model_servers": (server.url,), "log_level": "WARNING"})
    yield app
    app.extensions["client_pool"].close()


def test_score_selfplay_match_and_generate(app_with_nets):
    client = app_with_nets.test_client()
    responses = [
        "connect4_match",
        {"kind": "selfplay", "game": "dots_boxes", "opponent": "random", "games": 4, "simulations": 16},
        {"kind": "selfplay", "game": "connect4", "opponent": "connect4", "games": 2, "simulations": 8},
        {"kind": "selfplay", "game": "connect4", "mode": "generate", "games": 3, "simulations": 8, "seed": 5},
        {"kind": "selfplay", "game": "dots_boxes", "rows": 2, "cols": 2, "games": 2, "simulations": 8},  # not hosted
    ]
    response = client.post("/score", json={"responses": responses, "reward_function_kwargs": {"max_workers": 3}})
    assert response.status_code == 200
    body = response.get_json()
    match, dots, mirror, generate, missing = body["details"]
    assert match["games"] == 8 and match["wins"] + match["draws"] + match["losses"] == 8
    assert body["scores"][0] == (match["wins"] + 0.5 * match["draws"]) / 8
    assert match["network_calls"] > 0 and match["mean_batch_rows"] > 1 and match["servers"]
    assert dots["games"] == 4 and 0 <= body["scores"][1] <= 1
    assert mirror["games"] == 2 and mirror["wins"] + mirror["draws"] + mirror["losses"] == 2  # against itself
    records = generate["records"]
    states, policies, values = decode_records(records)
    assert records["games"] == 3 and not records["truncated"]
    assert states.shape == (records["positions"], 84) and policies.shape == (records["positions"], 7)
    assert np.allclose(policies.sum(axis=1), 1, atol=1e-2) and set(np.unique(values)) <= {-1.0, 0.0, 1.0}
    assert records["positions"] == generate["steps"]
    assert body["failures"] == 1 and "unknown model 'dots_boxes_2x2'" in missing["error"]
    again = client.post("/score", json={"responses": responses[:2]}).get_json()
    assert again["scores"] == body["scores"][:2]  # same seeds, same games


def test_generate_records_respect_the_size_cap(app_with_nets):
    spec = {"kind": "selfplay", "game": "connect4", "mode": "generate", "games": 4, "simulations": 4,
            "max_positions": 30}
    body = app_with_nets.test_client().post("/score", json={"responses": [spec]}).get_json()
    records = body["details"][0]["records"]
    assert records["positions"] <= 30 and records["truncated"]


BAD_SPECS = [
    ({"kind": "selfplay", "game": "chess"}, "unknown game 'chess'"),
    ({"kind": "selfplay", "game": "dots_boxes", "rows": 50}, "1-6 boxes a side"),
    ({"kind": "selfplay", "game": "connect4", "rows": 3}, "4-12 rows and columns"),
    ({"kind": "selfplay", "game": "connect4", "games": 0}, "games: must be an integer between 1 and 256"),
    ({"kind": "selfplay", "game": "connect4", "games": 3}, "even number of games"),
    ({"kind": "selfplay", "game": "connect4", "simulations": 10**6}, "simulations: must be an integer"),
    ({"kind": "selfplay", "game": "connect4", "mode": "train"}, "mode: must be 'match' or 'generate'"),
    ({"kind": "selfplay", "game": "connect4", "opponent": "../etc"}, "opponent: must be 'random', 'mcts'"),
    ({"kind": "selfplay", "game": "connect4", "episodes": 3}, "field(s) ['episodes'] do not apply to selfplay tasks"),
    ({"task": "cartpole", "games": 3}, "field(s) ['games'] do not apply to rollout tasks"),
    ({"kind": "tournament"}, "kind: must be one of ['libero', 'rollout', 'selfplay']"),
]


@pytest.mark.parametrize("spec, message", BAD_SPECS, ids=[m for _, m in BAD_SPECS])
def test_bad_selfplay_specs_get_400(app_with_nets, spec, message):
    response = app_with_nets.test_client().post("/score", json={"responses": [spec]})
    assert response.status_code == 400
    assert message in response.get_json()["error"]


def test_a_large_round_is_split_into_frames_a_server_accepts():
    sizes = []

    class Recording:
        def infer_batch(self, frames):
            sizes.append(len(frames))
            return [{"policy_logits": np.zeros(7, np.float32), "value": np.float32(0.25)} for _ in frames], "fake"

    evaluator = PolicyEvaluator(Recording(), max_rows_per_call=512)
    legal = np.ones((1100, 7), bool)
    priors, values = evaluator.evaluate(np.zeros((1100, 84), np.float32), legal)
    assert sizes == [512, 512, 76] and priors.shape == (1100, 7) and np.allclose(values, 0.25)


def one_line_left_and_lost(game):
    """A seeded Dots and Boxes position with one line left whose drawing still loses for the player to move."""
    rng = np.random.default_rng(0)
    while True:
        state = game.initial_state()
        while int(game.legal_mask(state).sum()) > 1:
            state = game.next_state(state, int(rng.choice(np.flatnonzero(game.legal_mask(state)))))
        if game.terminal(state):
            continue
        last = game.next_state(state, int(np.flatnonzero(game.legal_mask(state))[0]))
        if game.outcome(last) == (-1.0 if state.to_play == 0 else 1.0):
            return state


@pytest.mark.parametrize("selection", ["puct", "gumbel"])
def test_a_root_proven_lost_at_expansion_still_gets_a_policy(start_server, selection):
    """The look-ahead proves such a root lost before any simulation: its policy (sampled from in the opening
    moves, recorded as a training target) is uniform over the legal moves, never all zero."""
    game = make_game("dots_boxes")
    start = one_line_left_and_lost(game)
    server = start_server(models=nets(), log_level="WARNING")
    with ClientPool([server.url]).start(wait_s=10) as pool:
        agent = Agent("mcts", PolicyEvaluator(PoolPolicy(pool, "dots_boxes_3x3")),
                      MCTSConfig(simulations=16, selection=selection), noise=True)
        results = play_games(game, [(agent, agent)], np.random.default_rng(0), temperature_moves=1000, record=True,
                             starts=[start])
    result = results[0]
    assert result.moves == [int(np.flatnonzero(game.legal_mask(start))[0])]
    assert result.outcome == (-1.0 if start.to_play == 0 else 1.0)
    [policy] = result.policies
    assert np.allclose(policy, game.legal_mask(start) / game.legal_mask(start).sum())
