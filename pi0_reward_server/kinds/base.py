"""What every task kind shares: errors, limits, results, and the checks of numbers and names.

A kind is a module with ``NAME``, ``FIELDS`` (what a response of that kind may set), ``parse(where, fields,
defaults, limits) -> task``, ``run(task, policy_for, tracker=None, **options) -> TaskResult``,
``work(task, limits) -> (env steps, MCTS simulations)`` (an upper bound, for the per-request limits) and
``units(task)`` (what progress counts: episodes or games) and ``models(task)`` (the hosted models whose
versions fix its outcome, for the result cache). :mod:`pi0_reward_server.kinds.registry` finds
them; a new kind is one new module and one line there.

A task is a frozen dataclass with ``name``, ``model``, ``backend`` (its kind's name) and ``describe()``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Protocol

MODEL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class BatchPolicy(Protocol):
    def infer_batch(self, observations: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]: ...


PolicyFor = Callable[[str | None], BatchPolicy]
"""Gives the policy that serves a hosted model's name (None: the servers' default model)."""


class TaskError(ValueError):
    """A response or kwarg that cannot be turned into a task; ``field`` names where."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclasses.dataclass(frozen=True)
class Limits:
    max_episodes: int = 1000
    max_steps: int = 100_000
    default_episodes: int = 10
    default_seed: int = 0
    max_games: int = 256
    max_simulations: int = 1600
    max_positions: int = 20_000


def check_int(field: str, value: Any, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise TaskError(field, f"must be an integer between {low} and {high}, got {value!r}")
    return value


def check_number(field: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TaskError(field, f"must be a finite number, got {value!r:.80}")
    try:
        number = float(value)  # an int past float's range raises OverflowError here
    except OverflowError:
        raise TaskError(field, f"must be a finite number, got an integer of {value.bit_length()} bits") from None
    if not math.isfinite(number):
        raise TaskError(field, f"must be a finite number, got {value!r}")
    return number


def check_positive(field: str, value: Any) -> float:
    number = check_number(field, value)
    if number <= 0 or number > 100:
        raise TaskError(field, f"must be in (0, 100], got {value!r}")
    return number


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
