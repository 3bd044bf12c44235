"""How a trainer's sample names its task, shared by every adapter (and importable without Flask or torch).

A trainer sample carries its task in a column of its dataset (OpenRLHF's ``label``, verl's
``ground_truth``, a TRL column) or the adapter's configuration names one for all samples. Either is

* a task reference: ``"libero:libero_spatial:0"``, ``"cartpole"``, ``"gym:CartPole-v1"``;
* a JSON object string, or (where the trainer allows objects) the object itself, holding a ``/score``
  response spec: ``{"task": "libero:libero_goal:2", "episodes": 10}``.

A spec with ``"response_as": "prompt"`` takes the trainer's response (the generated text) as the task's
``prompt``: the instruction the served policy executes. Without it the response is not used.
"""

from __future__ import annotations

import json
from typing import Any, Mapping


class SampleError(ValueError):
    """A sample that names no usable task; the message starts with the field at fault."""


def task_spec(source: Any, where: str, response: str | None = None) -> str | dict[str, Any]:
    """The ``/score`` response for one sample whose task is named by ``source`` (found at ``where``)."""
    if isinstance(source, str) and not source.lstrip().startswith("{"):
        if not source.strip():
            raise SampleError(f"{where}: is empty; name a task (e.g. 'cartpole' or 'libero:libero_spatial:0')")
        return source.strip()
    if isinstance(source, str):
        try:
            spec = json.loads(source)
        except ValueError as exc:
            raise SampleError(f"{where}: not a JSON object: {exc}") from None
    else:
        from pi0_reward_server.integrations.remote import plain

        try:
            spec = plain(source)
        except TypeError as exc:
            raise SampleError(f"{where}: {exc}") from None
    if not isinstance(spec, Mapping):
        raise SampleError(f"{where}: must be a task reference or a JSON object, got {type(spec).__name__}")
    spec = dict(spec)
    response_as = spec.pop("response_as", None)
    if response_as not in (None, "prompt"):
        raise SampleError(f"{where}: response_as must be 'prompt', got {response_as!r:.80}")
    if response_as == "prompt":
        if not isinstance(response, str):
            raise SampleError(f"{where}: says response_as 'prompt' but the sample has no text response")
        spec["prompt"] = response.strip()
    return spec


def strip_prompt(query: str, prompt: Any) -> str:
    """OpenRLHF's query is prompt + response: the response alone."""
    return query[len(prompt):] if isinstance(prompt, str) and prompt and query.startswith(prompt) else query


def completion_text(completion: Any) -> str:
    """TRL's completion as text: a string, or conversational messages (the assistant's contents joined)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        parts = []
        for message in completion:
            content = message.get("content") if isinstance(message, Mapping) else None
            if isinstance(content, list):  # content blocks: [{"type": "text", "text": ...}]
                content = "".join(b.get("text", "") for b in content if isinstance(b, Mapping))
            if isinstance(content, str):
                parts.append(content)
        return "\n".join(parts)
    raise SampleError(f"completion: must be a string or a list of messages, got {type(completion).__name__}")
