"""Turning decoded frames into batcher requests, and results into replies.

A frame is either

* one observation: a map from keys to values (nested maps are flattened with
  ``/``, as openpi does), answered by one action map; or
* an explicit batch: a list of observation maps, answered by a list of action
  maps in the same order. Its rows join the same dynamic batch as everyone
  else's.

The optional key ``__model__`` names the hosted model to use; otherwise the
connection's model (from the URL path ``/models/<name>``) or the server's
default. Every problem raises :class:`ProtocolError` with a message naming it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from gpu_worker.model import STRING, TensorSpec

MODEL_KEY = "__model__"
MAX_DEPTH = 8  # nesting levels of observation maps
MAX_KEY_CHARS = 256
MAX_STRING_CHARS = 4096  # strings stack as fixed-width unicode: one long prompt would pad every row


class ProtocolError(ValueError):
    """The request is malformed; the message is sent back to the client."""


@dataclasses.dataclass
class ParsedFrame:
    model: str
    inputs: dict[str, np.ndarray]  # stacked, leading axis = rows
    rows: int
    is_batch: bool


def _is_map(value: Any) -> bool:
    """``isinstance(value, Mapping)``, answered without the ABC machinery for what msgpack decodes to
    (a check per observation value, on every request)."""
    if isinstance(value, dict):
        return True
    if isinstance(value, (np.ndarray, np.generic, str, bytes, int, float, list, tuple)) or value is None:
        return False
    return isinstance(value, Mapping)


def _flatten(obs: Mapping) -> dict[str, Any]:
    """Nested maps to ``a/b`` keys, iteratively, with bounded depth and key length."""
    flat: dict[str, Any] = {}
    stack: list[tuple[str, Mapping, int]] = [("", obs, 1)]
    while stack:
        prefix, mapping, depth = stack.pop()
        for key, value in mapping.items():
            if isinstance(key, bytes):
                key = key.decode("utf-8", "replace")
            if not isinstance(key, str):
                raise ProtocolError(f"observation keys must be strings, got {key!r:.80}")
            name = f"{prefix}{key}"
            if len(name) > MAX_KEY_CHARS:
                raise ProtocolError(f"observation key {name[:40]!r}... is longer than {MAX_KEY_CHARS} characters")
            if _is_map(value):
                if depth >= MAX_DEPTH:
                    raise ProtocolError(f"observation maps nest deeper than {MAX_DEPTH} levels")
                stack.append((f"{name}/", value, depth + 1))
            elif name in flat:
                raise ProtocolError(f"observation key {name!r} is given twice (nested and flat)")
            else:
                flat[name] = value
    return flat


def _describe(spec: TensorSpec) -> str:
    shape = "(" + ", ".join("*" if d is None else str(d) for d in spec.shape) + ("," if len(spec.shape) == 1 else "") + ")"
    return "a string" if spec.dtype == STRING else f"{spec.dtype} array of shape {shape}"


def coerce_value(key: str, value: Any, spec: TensorSpec) -> np.ndarray:
    """One observation value, checked against ``spec`` and cast to its dtype."""
    if spec.dtype == STRING:
        if isinstance(value, np.ndarray) and value.dtype.kind == "U" and value.ndim == 0:
            try:
                value = str(value)
            except (SystemError, ValueError, UnicodeError):
                raise ProtocolError(f"observation[{key!r}] holds invalid Unicode code points") from None
        if not isinstance(value, str):
            raise ProtocolError(f"observation[{key!r}] must be a string, got {type(value).__name__}")
        if len(value) > MAX_STRING_CHARS:
            raise ProtocolError(f"observation[{key!r}] holds {len(value)} characters; at most {MAX_STRING_CHARS}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError(f"observation[{key!r}] is not valid Unicode text (lone surrogates)") from None
        return np.asarray(value)
    if type(value) is np.ndarray and value.dtype == spec.numpy_dtype and value.shape == spec.exact_shape:
        return value  # what a well-behaved client sends: nothing to check or convert
    if isinstance(value, (str, bytes, type(None))):
        raise ProtocolError(f"observation[{key!r}] must be {_describe(spec)}, got {type(value).__name__}")
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"observation[{key!r}] is not an array: {exc}") from exc
    if array.dtype.kind not in "biuf":
        raise ProtocolError(f"observation[{key!r}] must be {_describe(spec)}, got values of dtype {array.dtype}")
    if len(array.shape) != len(spec.shape) or any(e is not None and e != d for e, d in zip(spec.shape, array.shape)):
        raise ProtocolError(f"observation[{key!r}] has shape {tuple(array.shape)}; expected {_describe(spec)}")
    target = spec.numpy_dtype
    if array.dtype != target:
        if not np.can_cast(array.dtype, target, "same_kind"):
            raise ProtocolError(f"observation[{key!r}] has dtype {array.dtype}; expected {_describe(spec)}")
        array = array.astype(target)
    return array


def coerce_observation(obs: Any, spec: Mapping[str, TensorSpec], model: str) -> dict[str, np.ndarray]:
    """Check one observation map against a model's input spec. Unknown keys are ignored."""
    if not _is_map(obs):
        raise ProtocolError(f"an observation must be a map of key -> value, got {type(obs).__name__}")
    flat = _flatten(obs)
    flat.pop(MODEL_KEY, None)
    missing = [key for key in spec if key not in flat]
    if missing:
        expected = ", ".join(f"{k!r}: {_describe(s)}" for k, s in spec.items())
        raise ProtocolError(f"observation is missing key(s) {missing} for model {model!r}, which expects {{{expected}}}")
    return {key: coerce_value(key, flat[key], s) for key, s in spec.items()}


def _model_name(obs: Any, default: str, models: Mapping[str, Any]) -> str:
    name = obs.get(MODEL_KEY, default) if _is_map(obs) else default
    if not isinstance(name, str):
        raise ProtocolError(f"{MODEL_KEY!r} must be a string naming a hosted model, got {type(name).__name__}")
    if name not in models:
        raise ProtocolError(f"unknown model {name!r}; this server hosts {sorted(models)}")
    return name


def parse_frame(
    frame: Any, *, specs: Mapping[str, Mapping[str, TensorSpec]], default_model: str, max_rows: int
) -> ParsedFrame:
    """Validate a decoded frame against the hosted models' input specs."""
    if _is_map(frame):
        model = _model_name(frame, default_model, specs)
        row = coerce_observation(frame, specs[model], model)
        return ParsedFrame(model, {k: v[None] for k, v in row.items()}, 1, False)
    if isinstance(frame, (list, tuple)):
        if not frame:
            raise ProtocolError("an explicit batch must hold at least one observation")
        if len(frame) > max_rows:
            raise ProtocolError(f"an explicit batch holds {len(frame)} observations; this server takes at most {max_rows}")
        names = {_model_name(obs, default_model, specs) for obs in frame}
        if len(names) > 1:
            raise ProtocolError(f"an explicit batch must use one model, got {sorted(names)}")
        model = names.pop()
        rows = []
        for i, obs in enumerate(frame):
            try:
                rows.append(coerce_observation(obs, specs[model], model))
            except ProtocolError as exc:
                raise ProtocolError(f"batch item {i}: {exc}") from None
        try:
            stacked = {key: np.stack([row[key] for row in rows]) for key in specs[model]}
        except ValueError as exc:  # free dimensions that differ between items
            raise ProtocolError(f"the items of an explicit batch must have equal shapes: {exc}") from None
        return ParsedFrame(model, stacked, len(rows), True)
    raise ProtocolError(
        f"a frame must be an observation map or a list of them, got {type(frame).__name__}"
    )


def build_reply(
    outputs: dict[str, np.ndarray], timing: dict[str, float], *, is_batch: bool, model: str, version: str
) -> dict | list:
    """One action map (or a list of them) carrying ``server_timing``."""
    def one(i: int) -> dict:
        action: dict[str, Any] = {key: value[i] for key, value in outputs.items()}
        action["server_timing"] = dict(timing)
        action["model"] = {"name": model, "version": version}
        return action

    rows = len(next(iter(outputs.values()))) if outputs else 1
    if is_batch:
        return [one(i) for i in range(rows)]
    return one(0)
