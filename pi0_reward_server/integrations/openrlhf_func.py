"""OpenRLHF's ``reward_func`` file, for evaluations longer than its 180 s HTTP reward call.

``--reward.remote_url /path/to/pi0_reward_server/integrations/openrlhf_func.py`` (before OpenRLHF 0.10.2:
``--remote_rm_url``). OpenRLHF imports ``reward_func(queries, prompts, labels, **kwargs)`` from a URL
ending in ``.py`` and calls it from threads, one sample per call in current versions (a batch in older
ones), with no time limit of its own. Here the samples of the concurrent calls are gathered into jobs on
the reward service, and each call waits for its own samples however long they take (``timeout_s``, an
hour by default), polling the job, so no HTTP request is held open across the evaluation.

A sample's task is its label: a task reference or a JSON spec string, as for the native route
(``/openrlhf/get_reward``); ``"response_as": "prompt"`` makes the response (the query without its prompt
prefix) the instruction the policy executes. Without a label, ``PI0_REWARD_TASK`` names the task.
OpenRLHF passes no settings to the function: they come from the environment of its processes
(``PI0_REWARD_URL``, ``PI0_REWARD_TOKEN``, ``PI0_REWARD_TASK``, ``PI0_REWARD_TIMEOUT_S``, ...; see
:class:`pi0_reward_server.integrations.remote.Options`); with Ray, put them in the job's ``env_vars``.

A sample that cannot be scored raises :class:`RewardServiceError` with the reason, logged as an error
first: OpenRLHF catches the exception, logs it only at INFO level and leaves the sample's reward unset
(the step then fails on the missing reward). Never a 0.0 that reads as a real zero.
"""

from __future__ import annotations

import logging
import pathlib
import sys
from typing import Any

try:
    from pi0_reward_server.integrations import remote, tasks
except ImportError:  # loaded by path from a checkout that is not installed: its root holds the package
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    from pi0_reward_server.integrations import remote, tasks

RewardServiceError = remote.RewardServiceError
logger = logging.getLogger("pi0_reward_server.integrations.openrlhf")


def reward_func(queries: list, prompts: list, labels: list, **kwargs: Any) -> dict[str, Any]:
    """``{"rewards": [...], "scores": [...], "extra_logs": {"cached": [...], "episodes": [...]}}``."""
    options = remote.Options.resolve(None)
    queries = list(queries)
    prompts = list(prompts) if prompts is not None else [None] * len(queries)
    labels = list(labels) if labels is not None else [None] * len(queries)
    if not len(queries) == len(prompts) == len(labels):
        raise ValueError(f"queries, prompts and labels hold {len(queries)}, {len(prompts)} and {len(labels)} items")
    outcomes: list[Any] = [None] * len(queries)
    specs, where = [], []
    for i, (query, prompt, label) in enumerate(zip(queries, prompts, labels)):
        own = label not in (None, "")
        source, spec_where = (label, f"labels[{i}]") if own else (options.task, "PI0_REWARD_TASK")
        try:
            if source is None:
                raise tasks.SampleError(f"labels[{i}]: names no task, and PI0_REWARD_TASK is not set")
            if not isinstance(query, str):
                raise tasks.SampleError(f"queries[{i}]: must be a string, got {type(query).__name__}")
            specs.append(tasks.task_spec(source, spec_where, tasks.strip_prompt(query, prompt)))
            where.append(i)
        except tasks.SampleError as exc:
            outcomes[i] = remote.Outcome.failed(str(exc))
    for i, future in zip(where, remote.batcher_for(options).submit(specs)):
        outcomes[i] = future.result()
    failed = [o for o in outcomes if not o.ok]
    if failed:
        message = f"{len(failed)} of {len(outcomes)} sample(s) could not be scored; first: {failed[0].error}"
        logger.error("pi0 reward: %s", message)  # OpenRLHF logs the exception only at INFO level
        raise RewardServiceError(message)
    scores = [o.score for o in outcomes]
    return {"rewards": scores, "scores": scores, "extra_logs": {
        "cached": [o.logs()["cached"] for o in outcomes], "episodes": [o.logs()["episodes"] for o in outcomes]}}
