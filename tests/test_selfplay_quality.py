"""The shipped networks beat MCTS with a uniform evaluator at equal simulations, through the servers.

scripts/train_selfplay.py measured (64 simulations, 64 games): see
bench/results/selfplay_training_<game>.json. This test asks a conservative
bound over fewer games and simulations, so it runs in CI time.
"""

from __future__ import annotations

import pytest

from gpu_worker.config import ModelConfig
from pi0_reward_server.app import create_app

SHIPPED = (
    ModelConfig.parse("connect4=gpu_worker.models.selfplay_net:Connect4Net"),
    ModelConfig.parse("dots_boxes_3x3=gpu_worker.models.selfplay_net:DotsBoxes3x3Net"),
)


@pytest.mark.slow
@pytest.mark.parametrize("game", ["connect4", "dots_boxes"])
def test_shipped_network_beats_uniform_mcts(start_server, game):
    server = start_server(models=SHIPPED, log_level="WARNING")
    app = create_app({"model_servers": (server.url,), "log_level": "WARNING"})
    try:
        spec = {"kind": "selfplay", "game": game, "opponent": "mcts", "games": 16, "simulations": 32, "seed": 1}
        body = app.test_client().post("/score", json={"responses": [spec]}).get_json()
        detail = body["details"][0]
        assert detail["error"] is None, detail["error"]
        assert body["scores"][0] >= 0.6, detail
    finally:
        app.extensions["client_pool"].close()
