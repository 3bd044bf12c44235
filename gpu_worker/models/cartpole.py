"""A small MLP policy that balances gymnasium's CartPole-v1 (the embedded default).

Observation ``observation/state``: the 4 CartPole floats (cart position,
cart velocity, pole angle, pole angular velocity). Action ``actions``: 0 (push
left) or 1 (push right), with the two ``logits``. The shipped checkpoint was
trained by ``scripts/train_cartpole.py`` (cross-entropy method, seeded);
the claim it carries, held for 500 steps on at least 95 of 100 seeded
episodes, is checked through the server by ``tests/test_cartpole_quality.py``.
"""

from __future__ import annotations

import torch

from gpu_worker.model import TensorSpec, TorchPolicy

OBS_DIM = 4
N_ACTIONS = 2


class CartPolePolicy(TorchPolicy, torch.nn.Module):
    input_spec = {"observation/state": TensorSpec((OBS_DIM,), "float32")}
    output_spec = {"actions": TensorSpec((), "int64"), "logits": TensorSpec((N_ACTIONS,), "float32")}
    default_checkpoint = "../checkpoints/cartpole_mlp.pt"

    def __init__(self, hidden: int = 32) -> None:
        torch.nn.Module.__init__(self)
        self.hidden = hidden
        self.net = torch.nn.Sequential(
            torch.nn.Linear(OBS_DIM, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, N_ACTIONS)
        )

    def metadata(self) -> dict:
        return {"env": "CartPole-v1", "action_space": "discrete(2)", "hidden": self.hidden}

    def forward(self, batch: dict) -> dict:
        logits = self.net(batch["observation/state"])
        return {"actions": logits.argmax(dim=-1), "logits": logits}
