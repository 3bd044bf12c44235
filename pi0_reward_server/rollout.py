"""Running tasks: the gymnasium rollout backend and the fan-out over a thread pool.

The policy a rollout talks to is anything with
``infer_batch(observations) -> (actions, server_url)``: :class:`PoolPolicy`
(the model servers, through the client pool) or :class:`LocalPolicy` (a model
in this process, for tests and baselines). The same seeded task gives the
same result through either.

Observation sent to the policy, per episode and step:
``observation/state`` = the env observation flattened to float32
(``gymnasium.spaces.flatten``: one-hot for a Discrete space), plus ``prompt``
when the task has one. Action expected back: ``actions``, an integer for a
Discrete action space, otherwise an array reshaped to the action space's
shape and clipped to its bounds. All episodes of a task step together: one
explicit batch frame per step where the server takes one (gpu_worker), else one
map per episode, sent concurrently (openpi's server).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from pi0_reward_server.tasks import RolloutTask, SelfPlayTask

logger = logging.getLogger(__name__)


class BatchPolicy(Protocol):
    def infer_batch(self, observations: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]: ...


@dataclasses.dataclass
class TaskResult:
    score: float
    episodes: int = 0
    successes: int | None = None
    mean_return: float | None = None
    steps: int = 0
    servers: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    task: dict[str, Any] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # kind-specific details

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(out.pop("extra"))
        return out


class PoolPolicy:
    """Reach the policy through a :class:`~pi0_reward_server.client_pool.ClientPool`."""

    def __init__(self, pool, model: str | None = None) -> None:
        self.pool = pool
        self.model = model
        self.last_server: str | None = None  # a task stays on a warm server while it is no busier

    def infer_batch(self, observations: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
        actions, self.last_server = self.pool.infer_batch(observations, prefer=self.last_server, model=self.model)
        return actions, self.last_server


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


PolicyFor = Callable[[str | None], BatchPolicy]
"""Gives the policy that serves a hosted model's name (None: the servers' default model)."""


def run_gym_task(task: RolloutTask, policy_for: PolicyFor, tracker=None) -> TaskResult:
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


def run_selfplay_task(task: SelfPlayTask, policy_for: PolicyFor, tracker=None) -> TaskResult:
    from pi0_reward_server.selfplay.games import make_game
    from pi0_reward_server.selfplay.mcts import MCTSConfig, UniformEvaluator
    from pi0_reward_server.selfplay.play import Agent, PolicyEvaluator, encode_records, match_score, play_games

    started = time.monotonic()
    game = make_game(task.game, task.rows, task.cols)
    config = MCTSConfig(simulations=task.simulations, leaves_per_round=task.leaves_per_round, c_puct=task.c_puct)
    rng = np.random.default_rng(task.seed)
    on_game_over = tracker.progress if tracker is not None else None
    network = PolicyEvaluator(policy_for(task.model))
    evaluators = [network]
    if task.mode == "generate":
        agent = Agent("mcts", network, config, noise=True)
        results = play_games(game, [(agent, agent)] * task.games, rng, temperature_moves=task.temperature_moves,
                             record=True, on_game_over=on_game_over)
        outcomes = [r.outcome for r in results]
        extra = {"games": task.games, "first_player_wins": sum(o > 0 for o in outcomes),
                 "draws": sum(o == 0 for o in outcomes), "records": encode_records(results, task.max_positions)}
        score = 1.0  # generation has no win rate; the records are the product
    else:
        ours = Agent("mcts", network, config)
        if task.opponent == "random":
            theirs = Agent("random")
        elif task.opponent == "mcts":
            theirs = Agent("mcts", UniformEvaluator(), config)
        else:
            opponent_net = PolicyEvaluator(policy_for(task.opponent))
            evaluators.append(opponent_net)
            theirs = Agent("mcts", opponent_net, config)
        seats = [(ours, theirs) if g % 2 == 0 else (theirs, ours) for g in range(task.games)]
        results = play_games(game, seats, rng, temperature_moves=task.temperature_moves, on_game_over=on_game_over)
        summary = match_score(results, [g % 2 for g in range(task.games)])
        score = summary.pop("score")
        extra = {"games": task.games, **summary}
    extra["network_calls"] = sum(e.calls for e in evaluators)
    extra["mean_batch_rows"] = sum(e.rows for e in evaluators) / max(1, sum(e.calls for e in evaluators))
    return TaskResult(
        score=score, steps=sum(len(r.moves) for r in results),
        servers=sorted(set().union(*(e.servers for e in evaluators))), seconds=time.monotonic() - started,
        task=task.describe(), extra=extra,
    )


def run_libero(task, policy_for: PolicyFor, tracker=None, **options: Any) -> TaskResult:
    from pi0_reward_server.libero_backend import run_libero_task

    return run_libero_task(task, policy_for, tracker=tracker, **options)


BACKENDS: dict[str, Callable[[Any, PolicyFor], TaskResult]] = {
    "gym": run_gym_task, "selfplay": run_selfplay_task, "libero": run_libero,
}


def run_task(task, policy_for: PolicyFor, failure_score: float, tracker=None, **options: Any) -> TaskResult:
    """Run one task; any failure becomes a result with ``failure_score`` and the error.

    ``tracker`` (a :class:`~pi0_reward_server.jobs.tracking.TaskTracker`) receives progress in units
    (episodes, games), and cancels the task's policy calls once its job is cancelled."""
    from pi0_reward_server.jobs.tracking import CancellablePolicy

    started = time.monotonic()
    if tracker is not None:
        inner = policy_for
        policy_for = lambda model: CancellablePolicy(inner(model), tracker)  # noqa: E731
    try:
        return BACKENDS[task.backend](task, policy_for, tracker=tracker, **options)
    except Exception as exc:  # noqa: BLE001 - every task gets exactly one result
        logger.warning("task %s failed: %s: %s", task.name, type(exc).__name__, exc)
        return TaskResult(
            score=failure_score, seconds=time.monotonic() - started, error=f"{type(exc).__name__}: {exc}",
            task=task.describe(),
        )


def run_tasks(
    tasks: list, policy_for: PolicyFor, *, max_workers: int, failure_score: float,
    offload: Callable[..., TaskResult] | None = None, trackers: list | None = None,
    on_result: Callable[[int, TaskResult], None] | None = None,
) -> list[TaskResult]:
    """Fan the tasks out over ``max_workers`` threads; results in task order.

    ``offload(task, tracker)``, when given, runs LIBERO tasks elsewhere (worker processes).
    ``trackers[i]`` follows task i (progress, cancellation); ``on_result(i, result)`` is called as each ends."""

    def one(i: int, task) -> TaskResult:
        tracker = trackers[i] if trackers is not None else None
        if offload is not None and task.backend == "libero":
            try:
                result = offload(task, tracker)
            except Exception as exc:  # noqa: BLE001 - a worker process died: the task still gets its result
                result = TaskResult(score=failure_score, error=f"{type(exc).__name__}: {exc}", task=task.describe())
        else:
            result = run_task(task, policy_for, failure_score, tracker=tracker)
        if on_result is not None:
            on_result(i, result)
        return result

    with concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="score") as executor:
        futures = [executor.submit(one, i, task) for i, task in enumerate(tasks)]
        return [future.result() for future in futures]
