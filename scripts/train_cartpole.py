"""Train the shipped CartPole policy with the cross-entropy method (seeded, ~1 min on 2 cores).

    python scripts/train_cartpole.py [--out gpu_worker/checkpoints/cartpole_mlp.pt]

CEM searches the MLP's weights directly: each generation samples a population
around a Gaussian mean, scores each by the mean return of a few seeded
episodes, and refits the Gaussian to the best fraction (Szita and Lorincz,
"Learning Tetris Using the Noisy Cross-Entropy Method", 2006). It stops when
the mean policy holds the pole for 500 steps on all of a set of check seeds,
then writes a torch state dict for gpu_worker.models.cartpole.CartPolePolicy.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from gpu_worker.models.cartpole import N_ACTIONS, OBS_DIM, CartPolePolicy  # noqa: E402

HIDDEN = 32
SIZES = [(HIDDEN, OBS_DIM), (HIDDEN,), (N_ACTIONS, HIDDEN), (N_ACTIONS,)]
N_PARAMS = sum(int(np.prod(s)) for s in SIZES)
TRAIN_SEEDS_BASE = 10_000  # evaluation in tests uses seeds 0..99, disjoint from these


def unflatten(theta: np.ndarray) -> list[np.ndarray]:
    out, i = [], 0
    for shape in SIZES:
        n = int(np.prod(shape))
        out.append(theta[i : i + n].reshape(shape))
        i += n
    return out


def episode_return(env: gym.Env, theta: np.ndarray, seed: int, max_steps: int = 500) -> float:
    w1, b1, w2, b2 = unflatten(theta)
    obs, _ = env.reset(seed=seed)
    total = 0.0
    for _ in range(max_steps):
        action = int(np.argmax(w2 @ np.tanh(w1 @ obs + b1) + b2))
        obs, reward, terminated, truncated, _ = env.step(action)
        total += reward
        if terminated or truncated:
            break
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_worker/checkpoints/cartpole_mlp.pt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--population", type=int, default=48)
    parser.add_argument("--elite-frac", type=float, default=0.2)
    parser.add_argument("--episodes", type=int, default=3, help="episodes per candidate")
    parser.add_argument("--generations", type=int, default=60)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    env = gym.make("CartPole-v1")
    mean, std = np.zeros(N_PARAMS), np.ones(N_PARAMS)
    n_elite = max(2, int(args.population * args.elite_frac))
    check_seeds = [TRAIN_SEEDS_BASE + 5000 + i for i in range(20)]
    started = time.monotonic()
    for gen in range(args.generations):
        pop = mean + std * rng.standard_normal((args.population, N_PARAMS))
        seeds = [TRAIN_SEEDS_BASE + gen * args.episodes + k for k in range(args.episodes)]
        scores = np.array([np.mean([episode_return(env, p, s) for s in seeds]) for p in pop])
        elite = pop[np.argsort(scores)[-n_elite:]]
        # Extra noise that decays keeps CEM from collapsing early (Szita and Lorincz, 2006).
        mean, std = elite.mean(axis=0), elite.std(axis=0) + max(0.5 - gen / 20, 0.02)
        check = np.mean([episode_return(env, mean, s) for s in check_seeds])
        print(f"gen {gen:3d}  best {scores.max():6.1f}  elite {np.sort(scores)[-n_elite:].mean():6.1f}  "
              f"mean-policy check {check:6.1f}  {time.monotonic() - started:5.1f}s", flush=True)
        if check >= 500 and gen >= 5:
            break

    policy = CartPolePolicy(hidden=HIDDEN)
    w1, b1, w2, b2 = (torch.tensor(a, dtype=torch.float32) for a in unflatten(mean))
    state = {"net.0.weight": w1, "net.0.bias": b1, "net.2.weight": w2, "net.2.bias": b2}
    policy.load_state_dict(state)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(policy.state_dict(), out)
    print(f"wrote {out} ({out.stat().st_size} bytes) after {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
