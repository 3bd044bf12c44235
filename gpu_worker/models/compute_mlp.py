"""A compute-bound MLP for benchmarks: its cost grows with the batch only slowly
at small batch sizes (weight reads dominate), which is what batching exploits.

``observation/state`` (in_dim floats) -> ``actions`` (out_dim floats). Weights
are a fixed seeded initialisation.
"""

from __future__ import annotations

import torch

from gpu_worker.model import TensorSpec, TorchPolicy


class ComputeMLP(TorchPolicy, torch.nn.Module):
    input_spec = {"observation/state": TensorSpec((64,), "float32")}
    output_spec = {"actions": TensorSpec((8,), "float32")}

    def __init__(self, width: int = 1024, depth: int = 4, seed: int = 0) -> None:
        torch.nn.Module.__init__(self)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        layers: list[torch.nn.Module] = [torch.nn.Linear(64, width), torch.nn.ReLU()]
        for _ in range(depth - 1):
            layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
        layers.append(torch.nn.Linear(width, 8))
        self.net = torch.nn.Sequential(*layers)
        torch.random.set_rng_state(generator_state)
        self.width, self.depth = width, depth

    def metadata(self) -> dict:
        return {"width": self.width, "depth": self.depth}

    def forward(self, batch: dict) -> dict:
        return {"actions": self.net(batch["observation/state"])}
