"""The task kinds, found by name: parsing a response into a task, its cost bound, running it.

Kinds (one module each, behind the interface in :mod:`pi0_reward_server.kinds.base`):
``rollout`` (:mod:`~pi0_reward_server.kinds.gym`), ``selfplay``
(:mod:`~pi0_reward_server.kinds.selfplay.kind`) and ``libero`` (:mod:`~pi0_reward_server.kinds.libero`).
A response names its kind with ``kind`` (default ``rollout``; a ``libero:`` reference or a registry entry
can imply it). Fields not given come from ``reward_function_kwargs``, then the registry entry, then the
kind's defaults.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Any, Callable, Mapping

from pi0_reward_server.kinds import gym, libero
from pi0_reward_server.kinds.base import Limits, PolicyFor, TaskError, TaskResult
from pi0_reward_server.kinds.selfplay import kind as selfplay

logger = logging.getLogger(__name__)

KINDS = {module.NAME: module for module in (gym, selfplay, libero)}  # what a response's "kind" names
BACKENDS = {"gym": gym, "selfplay": selfplay, "libero": libero}  # what a task's "backend" names
KIND_FIELDS = {name: module.FIELDS for name, module in KINDS.items()}
ALL_FIELDS = tuple(dict.fromkeys(f for fields in KIND_FIELDS.values() for f in fields))
KWARG_FIELDS = tuple(f for f in ALL_FIELDS if f not in ("kind", "env")) + ("max_workers", "cache", "response_as")
RESPONSE_AS = ("prompt",)  # what a free-text response can stand for
MAX_PROMPT_CHARS = 4096

REGISTRY: dict[str, dict[str, Any]] = {
    # The embedded default: the shipped CartPole MLP holds the pole for the full 500 steps.
    "cartpole": {"env": "CartPole-v1", "success_threshold": 475.0},
    # A short variant for quick checks and benchmarks: success is holding 100 steps.
    "cartpole_short": {"env": "CartPole-v1", "max_steps": 100, "success_threshold": 100.0},
    # Self-play matches of the shipped networks against MCTS with a uniform evaluator.
    "connect4_match": {"kind": "selfplay", "game": "connect4", "opponent": "mcts", "games": 8, "simulations": 32},
    "dots_boxes_match": {"kind": "selfplay", "game": "dots_boxes", "opponent": "mcts", "games": 8, "simulations": 32},
}


def validate_kwargs(kwargs: Any, limits: Limits) -> dict[str, Any]:
    """``reward_function_kwargs``: defaults for every task, plus ``max_workers``."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise TaskError("reward_function_kwargs", f"must be an object, got {type(kwargs).__name__}")
    unknown = sorted(set(kwargs) - set(KWARG_FIELDS))
    if unknown:
        raise TaskError("reward_function_kwargs", f"unknown field(s) {unknown}; known: {sorted(KWARG_FIELDS)}")
    if "cache" in kwargs and not isinstance(kwargs["cache"], bool):
        raise TaskError("reward_function_kwargs.cache", f"must be true or false, got {kwargs['cache']!r:.80}")
    if "response_as" in kwargs:
        if kwargs["response_as"] not in RESPONSE_AS:
            raise TaskError("reward_function_kwargs.response_as",
                            f"must be one of {list(RESPONSE_AS)}, got {kwargs['response_as']!r:.80}")
        if not isinstance(kwargs.get("task"), str):
            raise TaskError("reward_function_kwargs.task", "must name the task each response is the prompt of "
                                                           "(e.g. 'libero:libero_spatial:0') when response_as is set")
    return dict(kwargs)


def parse_task(index: int, response: Any, defaults: Mapping[str, Any], limits: Limits):
    """One response -> a validated :class:`RolloutTask`."""
    where = f"responses[{index}]"
    if defaults.get("response_as") == "prompt" and isinstance(response, str):
        # The response is free text the policy executes: the prompt of the task the kwargs name.
        if not response.strip() or len(response) > MAX_PROMPT_CHARS:
            raise TaskError(where, f"must be a prompt of 1 to {MAX_PROMPT_CHARS} characters, got {len(response)}")
        fields: dict[str, Any] = {"task": defaults["task"], "prompt": response}
    elif isinstance(response, str):
        fields = {"task": response}
    elif isinstance(response, Mapping):
        unknown = sorted(set(response) - set(ALL_FIELDS), key=str)
        if unknown:
            raise TaskError(where, f"unknown field(s) {unknown}; known: {list(ALL_FIELDS)}")
        fields = dict(response)
    else:
        raise TaskError(where, f"must be a task name or an object, got {type(response).__name__}")

    task_name = fields.get("task")
    registered = REGISTRY.get(task_name, {}) if isinstance(task_name, str) else {}
    is_libero_ref = isinstance(task_name, str) and task_name.startswith("libero:")
    kind = fields.get("kind", registered.get("kind", "libero" if is_libero_ref else "rollout"))
    if not isinstance(kind, str) or kind not in KIND_FIELDS:
        raise TaskError(f"{where}.kind", f"must be one of {sorted(KIND_FIELDS)}, got {kind!r}")
    foreign = sorted(set(fields) - set(KIND_FIELDS[kind]))
    if foreign:
        raise TaskError(where, f"field(s) {foreign} do not apply to {kind} tasks")
    defaults = {k: v for k, v in defaults.items() if k in KIND_FIELDS[kind] and k not in ("kind", "task")}
    return KINDS[kind].parse(where, fields, defaults, limits, REGISTRY)


def task_work(task, limits: Limits) -> tuple[int, int]:
    """An upper bound on (env steps, MCTS simulations) the task can cost."""
    return BACKENDS[task.backend].work(task, limits)


def models_of(task) -> list[str | None]:
    """The hosted models whose versions, with the spec, fix the task's outcome (the result cache's key)."""
    return BACKENDS[task.backend].models(task)


def units_of(task) -> int:
    """What a task's progress counts: episodes (rollouts, LIBERO) or games (self-play)."""
    return BACKENDS[task.backend].units(task)


def run_task(task, policy_for: PolicyFor, failure_score: float, tracker=None, **options: Any) -> TaskResult:
    """Run one task; any failure becomes a result with ``failure_score`` and the error.

    ``tracker`` (a :class:`~pi0_reward_server.jobs.tracking.TaskTracker`) receives progress in units
    (episodes, games), and cancels the task's policy calls once its job is cancelled."""
    from pi0_reward_server.jobs.tracking import CancellablePolicy
    from pi0_reward_server.policies import VersionRecorder

    started = time.monotonic()
    if tracker is not None:
        inner = policy_for
        policy_for = lambda model: CancellablePolicy(inner(model), tracker)  # noqa: E731
    versions: set[str] = set()
    recorded = policy_for
    policy_for = lambda model: VersionRecorder(recorded(model), versions)  # noqa: E731
    try:
        result = BACKENDS[task.backend].run(task, policy_for, tracker=tracker, **options)
        if versions:
            result.extra["model_versions"] = sorted(versions)
        return result
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
