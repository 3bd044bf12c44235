"""A TRL reward function backed by the reward service.

``GRPOTrainer(reward_funcs=[pi0_reward])`` (or ``make_reward_func(url=..., ...)`` for settings in code), or
on TRL's command line ``--reward_funcs pi0_reward_server.integrations.trl.pi0_reward``; TRL logs it as
``rewards/pi0_reward/...``. TRL awaits it with
the whole local batch: ``reward_func(prompts, completions, **columns) -> list[float | None]``, where every
dataset column except ``prompt`` arrives as a keyword list, one item per completion.

A sample's task is in the dataset's ``task`` column (``task_column`` to use another): a task reference
(``"libero:libero_spatial:0"``) or a JSON spec string (``'{"task": "libero:libero_goal:2", "episodes": 10,
"response_as": "prompt"}'``); with ``"response_as": "prompt"`` the completion (its text, or the
assistant's message contents for conversational data) is the instruction the policy executes. Without the
column, the ``task`` setting names the task of every sample.

Settings come from the environment (``PI0_REWARD_URL``, ``PI0_REWARD_TOKEN``, ``PI0_REWARD_TASK``,
``PI0_REWARD_TIMEOUT_S``, ... see :class:`pi0_reward_server.integrations.remote.Options`), or from
:func:`make_reward_func`'s arguments. A sample that cannot be scored is ``None``, which TRL reads as "not
applicable" (NaN, left out of its means), logged as a warning and counted in the ``pi0_reward/failed``
metric; ``on_failure="raise"`` (``PI0_REWARD_ON_FAILURE=raise``) raises instead.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import pathlib
import sys
from typing import Any, Callable

try:
    from pi0_reward_server.integrations import remote, tasks
except ImportError:  # loaded by path from a checkout that is not installed: its root holds the package
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    from pi0_reward_server.integrations import remote, tasks

RewardServiceError = remote.RewardServiceError
FAILURE_MODES = ("none", "raise")
logger = logging.getLogger("pi0_reward_server.integrations.trl")


def make_reward_func(*, task_column: str = "task", **settings: Any) -> Callable:
    """An async TRL reward function with these settings (over the ``PI0_REWARD_*`` environment): a
    :func:`functools.partial` of :func:`pi0_reward`, so it pickles (TRL's async GRPO sends reward functions
    to another process) and TRL names it ``pi0_reward``. Bad settings raise ValueError here, not mid-run."""
    remote.Options.resolve(settings, failure_modes=FAILURE_MODES, on_failure="none")
    return functools.partial(pi0_reward, _pi0_settings=dict(settings), _pi0_task_column=task_column)


async def pi0_reward(prompts: list, completions: list, *, _pi0_settings: dict | None = None,
                     _pi0_task_column: str = "task", **columns: Any) -> list[float | None]:
    """The reward function (settings from the environment); see the module's docstring."""
    options = remote.Options.resolve(_pi0_settings, failure_modes=FAILURE_MODES, on_failure="none")
    task_column = _pi0_task_column
    if len(prompts) != len(completions):
        raise ValueError(f"prompts holds {len(prompts)} items but completions holds {len(completions)}")
    column = columns.get(task_column)
    if column is not None and len(column) != len(completions):
        raise ValueError(f"column {task_column!r} holds {len(column)} items but completions holds {len(completions)}")
    outcomes: list[Any] = [None] * len(completions)
    specs, where = [], []
    for i, completion in enumerate(completions):
        own = column is not None and column[i] not in (None, "")
        source, spec_where = (column[i], f"{task_column}[{i}]") if own else (options.task, "task")
        try:
            if source is None:
                raise tasks.SampleError(f"{task_column}: names no task for this sample, and no task is set "
                                        f"(PI0_REWARD_TASK or make_reward_func(task=...))")
            specs.append(tasks.task_spec(source, spec_where, tasks.completion_text(completion)))
            where.append(i)
        except tasks.SampleError as exc:
            outcomes[i] = remote.Outcome.failed(str(exc))
    futures = remote.batcher_for(options).submit(specs)
    for i, outcome in zip(where, await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))):
        outcomes[i] = outcome
    failed = [o for o in outcomes if not o.ok]
    log_metric = columns.get("log_metric")
    if callable(log_metric):
        log_metric("pi0_reward/failed", float(len(failed)))
        log_metric("pi0_reward/cached", float(sum(bool(o.detail.get("cached")) for o in outcomes)))
    if failed:
        if options.on_failure == "raise":
            raise RewardServiceError(f"{len(failed)} of {len(outcomes)} sample(s) could not be scored; "
                                     f"first: {failed[0].error}")
        logger.warning("pi0 reward: %d of %d sample(s) could not be scored (None to TRL); first: %s",
                       len(failed), len(outcomes), failed[0].error)
    return [o.score if o.ok else None for o in outcomes]


reward_func = pi0_reward  # --reward_funcs pi0_reward_server.integrations.trl.reward_func works too
