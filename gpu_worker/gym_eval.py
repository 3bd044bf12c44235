"""Evaluate a served policy on a gymnasium task: ``python -m gpu_worker.gym_eval``.

Each client connection steps its share of the episodes together and sends
one explicit batch frame per step, so the server sees both explicit and
dynamic (cross-connection) batches. The policy receives
``observation/state`` (the env's observation as float32) and returns
``actions`` (an int for a discrete action space, else an array).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
import time

import numpy as np

from gpu_worker.client import ModelClient


@dataclasses.dataclass(frozen=True)
class Episode:
    seed: int
    steps: int
    episode_return: float


def _run_share(url: str, env_id: str, seeds: list[int], max_steps: int | None, model: str | None, out: list) -> None:
    import gymnasium as gym

    envs = {seed: gym.make(env_id, max_episode_steps=max_steps) if max_steps else gym.make(env_id) for seed in seeds}
    discrete = isinstance(next(iter(envs.values())).action_space, gym.spaces.Discrete)
    obs = {seed: env.reset(seed=seed)[0] for seed, env in envs.items()}
    steps = dict.fromkeys(seeds, 0)
    returns = dict.fromkeys(seeds, 0.0)
    live = list(seeds)
    with ModelClient(url) as client:
        while live:
            frames = [{"observation/state": np.asarray(obs[s], np.float32)} for s in live]
            if model:
                for frame in frames:
                    frame["__model__"] = model
            replies = client.infer_batch(frames)
            still = []
            for seed, reply in zip(live, replies):
                action = int(reply["actions"]) if discrete else np.asarray(reply["actions"])
                obs[seed], reward, terminated, truncated, _ = envs[seed].step(action)
                steps[seed] += 1
                returns[seed] += float(reward)
                if not (terminated or truncated):
                    still.append(seed)
            live = still
    out.extend(Episode(s, steps[s], returns[s]) for s in seeds)


def evaluate(
    url: str, env_id: str = "CartPole-v1", *, seeds: list[int], clients: int = 4,
    max_steps: int | None = None, model: str | None = None,
) -> list[Episode]:
    """Run one episode per seed through the server at ``url``; results in seed order."""
    results: list[Episode] = []
    errors: list[BaseException] = []

    def share(i: int) -> None:
        try:
            _run_share(url, env_id, seeds[i::clients], max_steps, model, results)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=share, args=(i,)) for i in range(min(clients, len(seeds)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return sorted(results, key=lambda e: e.seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8000")
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="episode i uses seed + i")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--success-return", type=float, default=500.0, help="an episode succeeds at this return")
    parser.add_argument("--model", help="hosted model name (default: the server's default)")
    args = parser.parse_args(argv)
    if args.episodes < 1 or args.clients < 1:
        parser.error("--episodes and --clients must be at least 1")
    started = time.monotonic()
    episodes = evaluate(
        args.url, args.env, seeds=[args.seed + i for i in range(args.episodes)], clients=args.clients, model=args.model
    )
    for e in episodes:
        print(f"seed {e.seed:4d}  steps {e.steps:4d}  return {e.episode_return:8.1f}")
    successes = sum(e.episode_return >= args.success_return for e in episodes)
    print(f"{args.env}: success {successes}/{len(episodes)} = {successes / len(episodes):.2f}, "
          f"mean return {np.mean([e.episode_return for e in episodes]):.1f}, {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
