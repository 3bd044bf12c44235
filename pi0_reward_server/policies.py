"""How a task reaches its policy: through the client pool, with a deadline, or in this process."""

from __future__ import annotations

import time
from typing import Any, Mapping

from pi0_reward_server.kinds.base import BatchPolicy


class PoolPolicy:
    """Reach the policy through a :class:`~pi0_reward_server.client_pool.ClientPool`."""

    def __init__(self, pool, model: str | None = None) -> None:
        self.pool = pool
        self.model = model
        self.last_server: str | None = None  # a task stays on a warm server while it is no busier

    def infer_batch(self, observations: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
        actions, self.last_server = self.pool.infer_batch(observations, prefer=self.last_server, model=self.model)
        return actions, self.last_server


class VersionRecorder:
    """Notes the ``name@version`` each reply says produced it (gpu_worker replies carry ``model``), so a task's
    result records the model versions behind it, a reload mid-task included."""

    def __init__(self, policy: BatchPolicy, seen: set[str]) -> None:
        self.policy = policy
        self.seen = seen

    def infer_batch(self, observations: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
        actions, url = self.policy.infer_batch(observations)
        for action in actions:
            model = action.get("model") if isinstance(action, dict) else None
            if isinstance(model, dict) and model.get("version") is not None:
                self.seen.add(f"{model.get('name')}@{model['version']}")
        return actions, url


class DeadlinePolicy:
    """Fails a task's next network call once its request's time is up, so no request runs forever."""

    def __init__(self, policy: BatchPolicy, deadline: float, budget_s: float) -> None:
        self.policy = policy
        self.deadline = deadline
        self.budget_s = budget_s

    def infer_batch(self, observations: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"the request's time limit ({self.budget_s:g}s, max_request_seconds) ran out")
        return self.policy.infer_batch(observations)


class LocalPolicy:
    """A hosted-model stand-in running in this process, with the server's validation."""

    def __init__(self, models: Mapping[str, Any], default: str, model: str | None = None) -> None:
        self.models = dict(models)
        self.model = model or default

    def infer_batch(self, observations: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
        from gpu_worker.protocol import parse_frame

        specs = {name: m.input_spec for name, m in self.models.items()}
        parsed = parse_frame(observations, specs=specs, default_model=self.model, max_rows=len(observations) + 1)
        outputs = self.models[parsed.model].infer_batch(parsed.inputs)
        return [{k: v[i] for k, v in outputs.items()} for i in range(parsed.rows)], "in-process"
