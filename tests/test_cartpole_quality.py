"""The shipped CartPole policy's claim, proven through the server: it holds the pole
for 500 steps on at least 95 of 100 seeded CartPole-v1 episodes (seeds 0-99,
disjoint from the training seeds)."""

from __future__ import annotations

import pytest

from gpu_worker.gym_eval import evaluate


@pytest.mark.slow
def test_shipped_cartpole_policy_balances_95_of_100_episodes(start_server):
    handle = start_server()  # the embedded default: cartpole is the default model
    episodes = evaluate(handle.url, "CartPole-v1", seeds=list(range(100)), clients=4)
    assert [e.seed for e in episodes] == list(range(100))
    held = sum(e.steps >= 500 for e in episodes)
    assert held >= 95, f"held {held}/100; shortest: {sorted(e.steps for e in episodes)[:5]}"
