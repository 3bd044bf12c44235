"""A LIBERO-shaped policy: openpi's LIBERO observation in, a 10x7 action chunk out.

It lets the whole pipeline (wire format, batching, LIBERO rollouts) run
without Pi0 weights. Its weights are a fixed random initialisation: its
success rate on LIBERO is about zero. Real scores need a real policy.

Inputs follow openpi's ``examples/libero/main.py``: ``observation/image`` and
``observation/wrist_image`` (224x224x3 uint8), ``observation/state`` (8 floats:
end-effector position 3, axis-angle 3, gripper qpos 2) and ``prompt`` (the
task's language). Output ``actions``: (10, 7) float32, 6 end-effector deltas
and a gripper command per step, in [-1, 1].
"""

from __future__ import annotations

import numpy as np
import torch

from gpu_worker.model import STRING, TensorSpec, TorchPolicy

IMAGE_SHAPE = (224, 224, 3)
STATE_DIM = 8
ACTION_HORIZON = 10
ACTION_DIM = 7


class LiberoTinyPolicy(TorchPolicy, torch.nn.Module):
    input_spec = {
        "observation/image": TensorSpec(IMAGE_SHAPE, "uint8"),
        "observation/wrist_image": TensorSpec(IMAGE_SHAPE, "uint8"),
        "observation/state": TensorSpec((STATE_DIM,), "float32"),
        "prompt": TensorSpec((), STRING),
    }
    output_spec = {"actions": TensorSpec((ACTION_HORIZON, ACTION_DIM), "float32")}

    def __init__(self, seed: int = 0, width: int = 16) -> None:
        torch.nn.Module.__init__(self)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # the weights are the seed: no checkpoint to ship
        self.encoder = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, kernel_size=8, stride=8), torch.nn.ReLU(),
            torch.nn.Conv2d(width, width, kernel_size=4, stride=4), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        )
        self.prompt_proj = torch.nn.Linear(256, width)
        self.head = torch.nn.Linear(3 * width + STATE_DIM, ACTION_HORIZON * ACTION_DIM)
        torch.random.set_rng_state(generator_state)

    def metadata(self) -> dict:
        return {"action_horizon": ACTION_HORIZON, "action_dim": ACTION_DIM, "note": "random weights; success rate ~0"}

    def _prompt_features(self, prompts: np.ndarray) -> torch.Tensor:
        # Byte histogram of the prompt: cheap, deterministic, and the output depends on the text.
        feats = np.zeros((len(prompts), 256), dtype=np.float32)
        for i, text in enumerate(prompts):
            data = np.frombuffer(str(text).encode("utf-8"), dtype=np.uint8)
            feats[i] = np.bincount(data, minlength=256)[:256] / max(len(data), 1)
        return torch.from_numpy(feats).to(self.head.weight.device, self.head.weight.dtype)

    def forward(self, batch: dict) -> dict:
        dtype = self.head.weight.dtype
        images = [
            self.encoder(batch[key].permute(0, 3, 1, 2).to(dtype) / 255.0)
            for key in ("observation/image", "observation/wrist_image")
        ]
        features = torch.cat([*images, self.prompt_proj(self._prompt_features(batch["prompt"])), batch["observation/state"]], dim=-1)
        actions = torch.tanh(self.head(features)).reshape(-1, ACTION_HORIZON, ACTION_DIM)
        return {"actions": actions}
