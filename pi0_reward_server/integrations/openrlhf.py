"""OpenRLHF's remote reward model protocol, served natively: ``--reward.remote_url
http://<app>:6006/openrlhf/get_reward`` (before OpenRLHF 0.10.2: ``--remote_rm_url``).

OpenRLHF POSTs ``{"query": [...], "prompts": [...], "labels": [...]}`` (one sample per request in current
versions, the whole batch in older ones; empty lists to all but the first of several URLs) and reads
``{"rewards": [...], "scores": [...], "extra_logs": {"k": [...]}}`` with lists as long as ``query``.

Sample i becomes a task:

* its **label** names it: a task reference (``"libero:libero_spatial:0"``, ``"cartpole"``) or a JSON
  object string holding a response spec (``'{"task": "libero:libero_goal:2", "episodes": 10}'``); with
  no labels, the app's ``openrlhf_task`` setting (a reference or a JSON object string) names it;
* its **response** is ``query`` without its ``prompt`` prefix (OpenRLHF's query is prompt + response).
  When the spec says ``"response_as": "prompt"`` the response is the task's prompt, the text the policy
  executes; otherwise the response is not used.

A task that fails is not a silent 0.0: the request answers 503 with the reason and ``Retry-After``, so
OpenRLHF retries (5 times) and then raises. OpenRLHF gives a call 180 s; the route waits at most
``openrlhf_timeout_s`` (170 s) and then answers 504, and since finished tasks are cached, a retry goes on
from where the last one stopped. Longer evaluations: submit jobs (``POST /jobs``).
"""

from __future__ import annotations

from typing import Any, Callable

from flask import Blueprint, jsonify, request

from pi0_reward_server.integrations.tasks import SampleError, strip_prompt, task_spec

MAX_TEXT = 1_000_000  # characters in one query or prompt


class _Bad(ValueError):
    pass


def _list(body: dict, name: str, n: int | None) -> list | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list):
        raise _Bad(f"{name}: must be a list, got {type(value).__name__}")
    if n is not None and len(value) != n:
        raise _Bad(f"{name}: holds {len(value)} items but query holds {n}")
    return value


def sample_spec(i: int, query: Any, prompt: Any, label: Any, default_task: str | None) -> Any:
    """OpenRLHF sample i -> a /score response (a task reference or a spec object)."""
    if not isinstance(query, str) or len(query) > MAX_TEXT:
        raise _Bad(f"query[{i}]: must be a string of at most {MAX_TEXT} characters")
    if prompt is not None and not isinstance(prompt, str):
        raise _Bad(f"prompts[{i}]: must be a string")
    source = label if label not in (None, "") else default_task
    where = f"labels[{i}]" if label not in (None, "") else "openrlhf_task"
    if source is None:
        raise _Bad(f"labels[{i}]: names no task, and the app has no openrlhf_task setting: put a task reference "
                   "or a JSON spec in the label column")
    if not isinstance(source, str):
        raise _Bad(f"{where}: must be a string (a task reference or a JSON object)")
    try:
        return task_spec(source, where, strip_prompt(query, prompt))
    except SampleError as exc:
        raise _Bad(str(exc)) from None


def blueprint(authorized: Callable[[], bool], unauthorized: Callable, score_and_wait: Callable, settings) -> Blueprint:
    bp = Blueprint("openrlhf", __name__)

    @bp.post("/openrlhf/get_reward")
    def get_reward():
        if not authorized():
            return unauthorized()
        body = request.get_json(silent=True, force=True)
        try:
            if not isinstance(body, dict):
                raise _Bad("body: must be a JSON object with 'query' (and 'prompts', 'labels')")
            queries = _list(body, "query", None)
            if queries is None:
                raise _Bad("query: missing; OpenRLHF sends {'query': [...], 'prompts': [...], 'labels': [...]}")
            prompts = _list(body, "prompts", len(queries))
            labels = _list(body, "labels", len(queries))
            if not queries:
                return jsonify(rewards=[], scores=[], extra_logs={})  # an idle extra URL: empty in, empty out
            responses = [sample_spec(i, q, prompts[i] if prompts else None, labels[i] if labels else None,
                                     settings.openrlhf_task) for i, q in enumerate(queries)]
        except _Bad as exc:
            return jsonify(error=str(exc), field=str(exc).split(":", 1)[0]), 400
        result, error = score_and_wait(min(settings.max_request_seconds, settings.openrlhf_timeout_s),
                                       {"responses": responses})
        if error is not None:
            return error
        failed = [d for d in result["details"] if d.get("error")]
        if failed:  # never a 0.0 the trainer cannot tell from a real zero
            response = jsonify(error=f"{len(failed)} of {len(responses)} task(s) failed; first: {failed[0]['error']}",
                               job_id=result["job_id"])
            response.status_code = 503
            response.headers["Retry-After"] = "5"
            return response
        scores = [float(s) for s in result["scores"]]
        return jsonify(rewards=scores, scores=scores, extra_logs={
            "cached": [int(bool(d.get("cached"))) for d in result["details"]],
            "episodes": [d.get("episodes", 0) for d in result["details"]],
        })

    return bp
