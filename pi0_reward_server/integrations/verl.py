"""verl's custom reward function, backed by the reward service.

verl loads this file by path (``reward.custom_reward_function.path``; older configs: top-level
``custom_reward_function.path``), binds ``custom_reward_function.reward_kwargs`` and calls

* ``compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs)``, the default name:
  once per sample, many at once from its reward loop. It is async; the calls that arrive together are
  gathered into one job on the service (``batch_window_s``, ``max_batch``) and each gets its own answer,
  ``{"score": float, "failed", "cached", "episodes", "seconds"}`` (verl logs the keys beside the score);
* ``compute_score_batch(data_sources, solution_strs, ground_truths, extra_infos, **kwargs)``, for verl's
  batch reward manager (``reward_manager=batch`` with ``custom_reward_function.name=compute_score_batch``):
  a list of the same dicts.

A sample's task is its ``ground_truth`` (``reward_model.ground_truth`` in verl's parquet): a task reference
(``"libero:libero_spatial:0"``) or a spec, as a JSON string or an object (``{"task": "libero:libero_goal:2",
"episodes": 10, "response_as": "prompt"}``); with ``"response_as": "prompt"`` the response
(``solution_str``) is the instruction the policy executes. A sample without one takes ``task`` from the
settings. ``data_source`` is not used (verl uses it to pick its built-in scorers; any name will do).

Settings (``+reward.custom_reward_function.reward_kwargs.<name>=...``, or ``PI0_REWARD_*`` environment
variables on verl's workers): ``url``, ``token``, ``task``, ``reward_function_kwargs``, ``timeout_s``,
``batch_window_s``, ``max_batch``, ``max_parallel``, ``retries``, ``task_retries``, ``on_failure``
(:class:`pi0_reward_server.integrations.remote.Options`). A sample that cannot be scored (the service
unreachable past the retries, a task that failed again after a resubmission, a task the service refuses)
raises :class:`RewardServiceError`: verl puts scores into tensors, where a None cannot go and a NaN would
poison the step silently. ``on_failure="nan"`` returns ``{"score": nan, "failed": 1.0, ...}`` instead,
for runs that filter such samples themselves.
"""

from __future__ import annotations

import asyncio
import logging
import math
import pathlib
import sys
from typing import Any

try:
    from pi0_reward_server.integrations import remote, tasks
except ImportError:  # loaded by path from a checkout that is not installed: its root holds the package
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    from pi0_reward_server.integrations import remote, tasks

RewardServiceError = remote.RewardServiceError
FAILURE_MODES = ("raise", "nan")
VERL_KWARGS = ("reward_router_address", "reward_model_tokenizer")  # verl's own extras: not settings
logger = logging.getLogger("pi0_reward_server.integrations.verl")


def _options(kwargs: dict[str, Any]) -> remote.Options:
    return remote.Options.resolve({k: v for k, v in kwargs.items() if k not in VERL_KWARGS},
                                  failure_modes=FAILURE_MODES)


def _spec(ground_truth: Any, solution_str: Any, default_task: Any) -> Any:
    source, where = ground_truth, "ground_truth"
    if source is None or (isinstance(source, str) and not source.strip()):
        source, where = default_task, "task"
    if source is None:
        raise tasks.SampleError("ground_truth: names no task, and the settings have no 'task': put a task "
                                "reference or a JSON spec in reward_model.ground_truth, or set reward_kwargs.task")
    return tasks.task_spec(source, where, solution_str if isinstance(solution_str, str) else None)


def _answer(outcome: remote.Outcome, options: remote.Options) -> dict[str, float]:
    if outcome.ok:
        return {"score": outcome.score, **outcome.logs()}
    if options.on_failure == "raise":
        raise RewardServiceError(outcome.error)
    logger.warning("pi0 reward: a sample failed, scored NaN: %s", outcome.error)
    return {"score": math.nan, **outcome.logs()}


def _submit(options: remote.Options, samples: list[tuple[Any, Any]]) -> list:
    """A future per sample (ground_truth, solution_str); samples naming no usable task fail at once."""
    batcher = remote.batcher_for(options)
    futures: list = [None] * len(samples)
    specs, where = [], []
    for i, (ground_truth, solution_str) in enumerate(samples):
        try:
            specs.append(_spec(ground_truth, solution_str, options.task))
            where.append(i)
        except tasks.SampleError as exc:
            futures[i] = remote.Outcome.failed(str(exc))
    for i, future in zip(where, batcher.submit(specs)):
        futures[i] = future
    return futures


async def compute_score(data_source: Any, solution_str: str, ground_truth: Any, extra_info: Any = None,
                        **kwargs: Any) -> dict[str, float]:
    """verl's per-sample reward: ``{"score": float, "failed", "cached", "episodes", "seconds"}``."""
    options = _options(kwargs)
    (pending,) = _submit(options, [(ground_truth, solution_str)])
    outcome = pending if isinstance(pending, remote.Outcome) else await asyncio.wrap_future(pending)
    return _answer(outcome, options)


def compute_score_batch(data_sources: Any, solution_strs: Any, ground_truths: Any, extra_infos: Any = None,
                        **kwargs: Any) -> list[dict[str, float]]:
    """verl's batch reward manager: a list of the same dicts as :func:`compute_score`, in order."""
    options = _options(kwargs)
    solutions, truths = list(solution_strs), list(ground_truths)
    if len(solutions) != len(truths):
        raise ValueError(f"solution_strs holds {len(solutions)} items but ground_truths holds {len(truths)}")
    pending = _submit(options, list(zip(truths, solutions)))
    outcomes = [p if isinstance(p, remote.Outcome) else p.result() for p in pending]
    return [_answer(outcome, options) for outcome in outcomes]
