"""Run by test_openpi_client.py with the python of a venv holding the unmodified openpi-client.

Prints one JSON line describing what the real client saw.
"""

import json
import sys

import numpy as np
from openpi_client import image_tools
from openpi_client.websocket_client_policy import WebsocketClientPolicy

host, port = sys.argv[1], int(sys.argv[2])
policy = WebsocketClientPolicy(host=host, port=port)
meta = policy.get_server_metadata()
rng = np.random.default_rng(0)
obs = {
    "observation/image": image_tools.convert_to_uint8(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)),
    "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
    "observation/state": rng.normal(size=8),  # float64, as LIBERO's example sends it
    "prompt": "put the bowl on the plate",
}
out = policy.infer(obs)
error = None
try:
    policy.infer({"observation/image": np.zeros((3, 3), np.uint8)})
except RuntimeError as exc:
    error = str(exc)
after = policy.infer(obs)
print(json.dumps({
    "metadata_model": meta.get("model"),
    "metadata_models": sorted(meta.get("models", {})),
    "action_horizon": meta.get("action_horizon"),
    "actions_shape": list(out["actions"].shape),
    "actions_dtype": out["actions"].dtype.str,
    "actions": out["actions"].tolist(),
    "same_after_error": bool(np.array_equal(out["actions"], after["actions"])),
    "server_timing": sorted(out["server_timing"]),
    "second_timing": sorted(after["server_timing"]),
    "error": error,
}))
