"""Policy-value networks for the self-play games (AlphaZero style), hosted like any policy.

Input ``observation/board``: the game's encoding from the mover's view
(float32, ``obs_dim``). Outputs ``policy_logits`` (one per action; the client
masks illegal moves) and ``value`` in [-1, 1] for the player to move.
Shipped checkpoints are trained by ``scripts/train_selfplay.py``.
"""

from __future__ import annotations

import torch

from gpu_worker.model import TensorSpec, TorchPolicy


class PolicyValueNet(TorchPolicy, torch.nn.Module):
    def __init__(self, obs_dim: int, num_actions: int, hidden: int = 256, game: str = "") -> None:
        torch.nn.Module.__init__(self)
        self.obs_dim, self.num_actions, self.hidden, self.game = obs_dim, num_actions, hidden, game
        self.input_spec = {"observation/board": TensorSpec((obs_dim,), "float32")}
        self.output_spec = {"policy_logits": TensorSpec((num_actions,), "float32"), "value": TensorSpec((), "float32")}
        self.trunk = torch.nn.Sequential(
            torch.nn.Linear(obs_dim, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        )
        self.policy_head = torch.nn.Linear(hidden, num_actions)
        self.value_head = torch.nn.Sequential(torch.nn.Linear(hidden, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))

    def metadata(self) -> dict:
        return {"game": self.game, "obs_dim": self.obs_dim, "num_actions": self.num_actions, "hidden": self.hidden}

    def forward(self, batch: dict) -> dict:
        h = self.trunk(batch["observation/board"])
        return {"policy_logits": self.policy_head(h), "value": torch.tanh(self.value_head(h)).squeeze(-1)}


class Connect4Net(PolicyValueNet):
    """Connect Four on the standard 6x7 board."""

    default_checkpoint = "../checkpoints/connect4_6x7.pt"

    def __init__(self, hidden: int = 256) -> None:
        super().__init__(obs_dim=2 * 6 * 7, num_actions=7, hidden=hidden, game="connect4_6x7")


class DotsBoxes3x3Net(PolicyValueNet):
    """Dots and Boxes with 3x3 boxes (24 edges)."""

    default_checkpoint = "../checkpoints/dots_boxes_3x3.pt"

    def __init__(self, hidden: int = 256) -> None:
        super().__init__(obs_dim=24 + 2 * 9 + 1, num_actions=24, hidden=hidden, game="dots_boxes_3x3")
