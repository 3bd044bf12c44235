"""Gymnasium rollouts: a policy acts in any registered environment; the score is a success rate or a
normalised return.

A response: a registry name (see :data:`pi0_reward_server.kinds.registry.REGISTRY`), ``gym:<EnvId>``, or
``{"task": ..., "env": ..., "episodes", "seed", "max_steps", "model", "success_threshold", "return_range",
"prompt"}``. The score is the success rate when the task has a ``success_threshold`` (an episode succeeds
when its return reaches it; without ``return_range`` it defaults to the environment's own
``reward_threshold``); otherwise it must give ``return_range`` and scores
``clip((mean_return - lo) / (hi - lo), 0, 1)``. Nothing in a request imports code: environment ids must
already be in gymnasium's registry, and ``module:Env`` ids are refused.

Observation sent to the policy, per episode and step: ``observation/state`` = the env observation
flattened to float32 (``gymnasium.spaces.flatten``: one-hot for a Discrete space), plus ``prompt`` when
the task has one. Action expected back: ``actions``, an integer for a Discrete action space, otherwise an
array reshaped to the action space's shape and clipped to its bounds. All episodes of a task step
together: one explicit batch frame per step where the server takes one (gpu_worker), else one map per
episode, sent concurrently (openpi's server).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping

import numpy as np

from pi0_reward_server.kinds.base import Limits, PolicyFor, TaskError, TaskResult, check_int, check_number

NAME = "rollout"
FIELDS = ("kind", "task", "env", "episodes", "seed", "max_steps", "model", "success_threshold", "return_range",
          "prompt")


@dataclasses.dataclass(frozen=True)
class RolloutTask:
    name: str  # what the response called it
    env: str  # gymnasium env id
    episodes: int
    seed: int
    max_steps: int | None  # per episode; None keeps the env's own limit
    model: str | None  # hosted model name; None: each server's default
    success_threshold: float | None
    return_range: tuple[float, float] | None
    prompt: str | None
    backend: str = "gym"

    def describe(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def _gym_env_id(field: str, env: Any) -> str:
    if not isinstance(env, str) or not env:
        raise TaskError(field, f"must be a gymnasium env id string, got {env!r}")
    env_id = env[4:] if env.startswith("gym:") else env
    if ":" in env_id:
        raise TaskError(field, f"env id {env_id!r} names a module to import; only registered env ids are allowed")
    import gymnasium

    if env_id not in gymnasium.envs.registry:
        raise TaskError(field, f"unknown gymnasium env {env_id!r} (not in gymnasium's registry)")
    return env_id



def parse(where: str, fields: dict[str, Any], defaults: Mapping[str, Any], limits: Limits,
          registry: Mapping[str, Mapping[str, Any]]) -> RolloutTask:
    fields.pop("kind", None)
    reference = fields.get("task", fields.get("env"))
    if reference is None:
        raise TaskError(where, "names no task: give 'task' (a registry name or 'gym:<EnvId>') or 'env'")
    if not isinstance(reference, str):
        raise TaskError(f"{where}.task", f"must be a string, got {type(reference).__name__}")
    if reference in registry:
        base = dict(registry[reference])
    elif reference.startswith("gym:") or "env" in fields:
        base = {"env": fields.get("env", reference)}
    else:
        raise TaskError(where, f"unknown task {reference!r}; known: {sorted(registry)} or 'gym:<EnvId>'")

    merged = {**base, **defaults}
    merged.update({k: v for k, v in fields.items() if k != "task"})
    env = _gym_env_id(f"{where}.env", merged["env"])

    episodes = check_int(f"{where}.episodes", merged.get("episodes", limits.default_episodes), 1, limits.max_episodes)
    seed = check_int(f"{where}.seed", merged.get("seed", limits.default_seed), 0, 2**31 - 1)
    max_steps = merged.get("max_steps")
    if max_steps is not None:
        max_steps = check_int(f"{where}.max_steps", max_steps, 1, limits.max_steps)
    model = merged.get("model")
    if model is not None and (not isinstance(model, str) or not 0 < len(model) <= 64):
        raise TaskError(f"{where}.model", f"must be a hosted model's name, got {model!r}")
    prompt = merged.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or len(prompt) > 10_000):
        raise TaskError(f"{where}.prompt", "must be a string of at most 10000 characters")

    threshold = merged.get("success_threshold")
    if threshold is not None:
        threshold = check_number(f"{where}.success_threshold", threshold)
    return_range = merged.get("return_range")
    if return_range is not None:
        if not isinstance(return_range, (list, tuple)) or len(return_range) != 2:
            raise TaskError(f"{where}.return_range", f"must be [low, high], got {return_range!r}")
        low, high = (check_number(f"{where}.return_range", v) for v in return_range)
        if not low < high:
            raise TaskError(f"{where}.return_range", f"low must be below high, got {return_range!r}")
        return_range = (low, high)
    if threshold is None and return_range is None:
        import gymnasium

        threshold = gymnasium.envs.registry[env].reward_threshold
        if threshold is None:
            raise TaskError(where, f"env {env!r} defines no reward_threshold: give success_threshold or return_range")
        threshold = float(threshold)
    return RolloutTask(
        name=reference, env=env, episodes=episodes, seed=seed, max_steps=max_steps, model=model,
        success_threshold=threshold,
        return_range=return_range, prompt=prompt,
    )




def run(task: RolloutTask, policy_for: PolicyFor, tracker=None) -> TaskResult:
    import gymnasium as gym

    policy = policy_for(task.model)
    started = time.monotonic()
    kwargs = {"max_episode_steps": task.max_steps} if task.max_steps else {}
    envs = [gym.make(task.env, **kwargs) for _ in range(task.episodes)]
    try:
        obs_space, act_space = envs[0].observation_space, envs[0].action_space
        discrete = isinstance(act_space, gym.spaces.Discrete)
        obs = [env.reset(seed=task.seed + i)[0] for i, env in enumerate(envs)]
        returns = [0.0] * task.episodes
        live = list(range(task.episodes))
        steps = 0
        servers: set[str] = set()
        while live:
            frames = []
            for i in live:
                frame: dict[str, Any] = {"observation/state": gym.spaces.flatten(obs_space, obs[i]).astype(np.float32)}
                if task.prompt is not None:
                    frame["prompt"] = task.prompt
                frames.append(frame)
            actions, server = policy.infer_batch(frames)
            if len(actions) != len(frames):
                raise RuntimeError(f"policy answered {len(actions)} actions for a batch of {len(frames)} observations")
            servers.add(server)
            still = []
            for i, reply in zip(live, actions):
                raw = reply["actions"]
                if discrete:
                    action: Any = int(np.asarray(raw).reshape(-1)[0])
                else:
                    action = np.clip(np.asarray(raw, dtype=act_space.dtype).reshape(act_space.shape), act_space.low, act_space.high)
                obs[i], reward, terminated, truncated, _ = envs[i].step(action)
                returns[i] += float(reward)
                steps += 1
                if not (terminated or truncated):
                    still.append(i)
            if tracker is not None and len(still) < len(live):
                tracker.progress(task.episodes - len(still))
            live = still
    finally:
        for env in envs:
            env.close()
    mean_return = float(np.mean(returns))
    if task.success_threshold is not None:
        successes = sum(r >= task.success_threshold for r in returns)
        score = successes / task.episodes
    else:
        low, high = task.return_range  # parse_task guarantees one of the two
        successes = None
        score = float(np.clip((mean_return - low) / (high - low), 0.0, 1.0))
    return TaskResult(
        score=score, episodes=task.episodes, successes=successes, mean_return=mean_return, steps=steps,
        servers=sorted(servers), seconds=time.monotonic() - started, task=task.describe(),
    )



def work(task: RolloutTask, limits: Limits) -> tuple[int, int]:
    import gymnasium

    steps = task.max_steps or gymnasium.envs.registry[task.env].max_episode_steps or limits.max_steps
    return task.episodes * min(steps, limits.max_steps), 0


def units(task: RolloutTask) -> int:
    return task.episodes


def models(task) -> list[str | None]:
    """The hosted models whose versions fix the outcome (None: the servers' default)."""
    return [task.model]
