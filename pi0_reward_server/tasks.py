"""What a response can ask for: parsing and validating rollout task specs.

A response is either a task reference (a name from :data:`REGISTRY`, or
``gym:<EnvId>`` for any registered gymnasium environment) or an object::

    {"task": "cartpole" | "gym:<EnvId>", "episodes": 10, "seed": 0,
     "max_steps": 500, "model": "cartpole", "success_threshold": 475.0,
     "return_range": [lo, hi], "prompt": "..."}

Fields not given come from ``reward_function_kwargs``, then the registry entry,
then the defaults. The score of a task is its success rate when it has a
``success_threshold`` (an episode succeeds when its return reaches it; without
``return_range`` it defaults to the environment's own ``reward_threshold``);
otherwise it must give ``return_range`` and scores
``clip((mean_return - lo) / (hi - lo), 0, 1)``.

Nothing in a request imports code: environment ids must already be in
gymnasium's registry, and ``module:Env`` ids are refused.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

KIND_FIELDS = {  # what a response of each kind may set
    "rollout": ("kind", "task", "env", "episodes", "seed", "max_steps", "model", "success_threshold", "return_range",
                "prompt"),
    "selfplay": ("kind", "task", "game", "rows", "cols", "games", "simulations", "opponent", "model", "seed", "mode",
                 "leaves_per_round", "temperature_moves", "c_puct", "max_positions"),
    "libero": ("kind", "task", "suite", "task_id", "episodes", "seed", "init_state", "max_steps", "prompt", "model",
               "replan_steps"),
}
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


class TaskError(ValueError):
    """A response or kwarg that cannot be turned into a task; ``field`` names where."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclasses.dataclass(frozen=True)
class RolloutTask:
    name: str  # what the response called it
    env: str  # gymnasium env id
    episodes: int
    seed: int
    max_steps: int | None  # per episode; None keeps the env's own limit
    model: str | None  # hosted model name; None: each server's default
    success_threshold: float | None
    return_range: tuple[float, float] | None
    prompt: str | None
    backend: str = "gym"

    def describe(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class SelfPlayTask:
    """Games between a hosted network (MCTS) and an opponent, or self-play that yields records."""

    name: str
    game: str  # "connect4" or "dots_boxes"
    rows: int
    cols: int
    games: int
    simulations: int
    opponent: str  # "random", "mcts" (uniform evaluator) or a hosted model's name
    model: str  # the hosted network being scored (or generating)
    seed: int
    mode: str  # "match" (score = win rate, a draw counts half) or "generate" (training records)
    leaves_per_round: int
    temperature_moves: int
    c_puct: float
    max_positions: int
    backend: str = "selfplay"

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Limits:
    max_episodes: int = 1000
    max_steps: int = 100_000
    default_episodes: int = 10
    default_seed: int = 0
    max_games: int = 256
    max_simulations: int = 1600
    max_positions: int = 20_000


def _int(field: str, value: Any, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise TaskError(field, f"must be an integer between {low} and {high}, got {value!r}")
    return value


def _number(field: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TaskError(field, f"must be a finite number, got {value!r:.80}")
    try:
        number = float(value)  # an int past float's range raises OverflowError here
    except OverflowError:
        raise TaskError(field, f"must be a finite number, got an integer of {value.bit_length()} bits") from None
    if not math.isfinite(number):
        raise TaskError(field, f"must be a finite number, got {value!r}")
    return number


def _gym_env_id(field: str, env: Any) -> str:
    if not isinstance(env, str) or not env:
        raise TaskError(field, f"must be a gymnasium env id string, got {env!r}")
    env_id = env[4:] if env.startswith("gym:") else env
    if ":" in env_id:
        raise TaskError(field, f"env id {env_id!r} names a module to import; only registered env ids are allowed")
    import gymnasium

    if env_id not in gymnasium.envs.registry:
        raise TaskError(field, f"unknown gymnasium env {env_id!r} (not in gymnasium's registry)")
    return env_id


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


def parse_task(index: int, response: Any, defaults: Mapping[str, Any], limits: Limits) -> RolloutTask:
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
    if kind == "selfplay":
        return parse_selfplay(where, fields, defaults, limits)
    if kind == "libero":
        return parse_libero(where, fields, defaults, limits)
    fields.pop("kind", None)
    reference = fields.get("task", fields.get("env"))
    if reference is None:
        raise TaskError(where, "names no task: give 'task' (a registry name or 'gym:<EnvId>') or 'env'")
    if not isinstance(reference, str):
        raise TaskError(f"{where}.task", f"must be a string, got {type(reference).__name__}")
    if reference in REGISTRY:
        base = dict(REGISTRY[reference])
    elif reference.startswith("gym:") or "env" in fields:
        base = {"env": fields.get("env", reference)}
    else:
        raise TaskError(where, f"unknown task {reference!r}; known: {sorted(REGISTRY)} or 'gym:<EnvId>'")

    merged = {**base, **defaults}
    merged.update({k: v for k, v in fields.items() if k != "task"})
    env = _gym_env_id(f"{where}.env", merged["env"])

    episodes = _int(f"{where}.episodes", merged.get("episodes", limits.default_episodes), 1, limits.max_episodes)
    seed = _int(f"{where}.seed", merged.get("seed", limits.default_seed), 0, 2**31 - 1)
    max_steps = merged.get("max_steps")
    if max_steps is not None:
        max_steps = _int(f"{where}.max_steps", max_steps, 1, limits.max_steps)
    model = merged.get("model")
    if model is not None and (not isinstance(model, str) or not 0 < len(model) <= 64):
        raise TaskError(f"{where}.model", f"must be a hosted model's name, got {model!r}")
    prompt = merged.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or len(prompt) > 10_000):
        raise TaskError(f"{where}.prompt", "must be a string of at most 10000 characters")

    threshold = merged.get("success_threshold")
    if threshold is not None:
        threshold = _number(f"{where}.success_threshold", threshold)
    return_range = merged.get("return_range")
    if return_range is not None:
        if not isinstance(return_range, (list, tuple)) or len(return_range) != 2:
            raise TaskError(f"{where}.return_range", f"must be [low, high], got {return_range!r}")
        low, high = (_number(f"{where}.return_range", v) for v in return_range)
        if not low < high:
            raise TaskError(f"{where}.return_range", f"low must be below high, got {return_range!r}")
        return_range = (low, high)
    if threshold is None and return_range is None:
        import gymnasium

        threshold = gymnasium.envs.registry[env].reward_threshold
        if threshold is None:
            raise TaskError(where, f"env {env!r} defines no reward_threshold: give success_threshold or return_range")
        threshold = float(threshold)
    return RolloutTask(
        name=reference, env=env, episodes=episodes, seed=seed, max_steps=max_steps, model=model,
        success_threshold=threshold,
        return_range=return_range, prompt=prompt,
    )


_MODEL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def parse_selfplay(where: str, fields: dict[str, Any], defaults: Mapping[str, Any], limits: Limits) -> SelfPlayTask:
    from pi0_reward_server.selfplay.games import DEFAULT_SIZES, GAMES, make_game

    reference = fields.get("task")
    base = dict(REGISTRY[reference]) if isinstance(reference, str) and reference in REGISTRY else {}
    merged = {**base, **defaults}
    merged.update({k: v for k, v in fields.items() if k not in ("task", "kind")})
    game = merged.get("game")
    if not isinstance(game, str) or game not in GAMES:
        raise TaskError(f"{where}.game", f"unknown game {game!r}; known: {sorted(GAMES)}")
    rows = _int(f"{where}.rows", merged.get("rows", DEFAULT_SIZES[game][0]), 1, 64)
    cols = _int(f"{where}.cols", merged.get("cols", DEFAULT_SIZES[game][1]), 1, 64)
    try:
        board = make_game(game, rows, cols)
    except ValueError as exc:
        raise TaskError(f"{where}.rows", str(exc)) from None
    default_model = "connect4" if (game, rows, cols) == ("connect4", 6, 7) else board.name
    model = merged.get("model", default_model)
    if not isinstance(model, str) or not _MODEL_NAME.match(model):
        raise TaskError(f"{where}.model", f"must be a hosted model's name, got {model!r}")
    opponent = merged.get("opponent", "mcts")
    if not isinstance(opponent, str) or not _MODEL_NAME.match(opponent):
        raise TaskError(f"{where}.opponent", f"must be 'random', 'mcts' or a hosted model's name, got {opponent!r}")
    mode = merged.get("mode", "match")
    if mode not in ("match", "generate"):
        raise TaskError(f"{where}.mode", f"must be 'match' or 'generate', got {mode!r}")
    games = _int(f"{where}.games", merged.get("games", 8), 1, limits.max_games)
    if mode == "match" and games % 2:
        raise TaskError(f"{where}.games", f"a match needs an even number of games (each side moves first half the time), got {games}")
    return SelfPlayTask(
        name=str(reference or f"selfplay:{game}"), game=game, rows=rows, cols=cols, games=games,
        simulations=_int(f"{where}.simulations", merged.get("simulations", 32), 1, limits.max_simulations),
        opponent=opponent, model=model,
        seed=_int(f"{where}.seed", merged.get("seed", limits.default_seed), 0, 2**31 - 1), mode=mode,
        leaves_per_round=_int(f"{where}.leaves_per_round", merged.get("leaves_per_round", 8), 1, 64),
        temperature_moves=_int(f"{where}.temperature_moves", merged.get("temperature_moves", 2 if mode == "match" else 8), 0, 1000),
        c_puct=_positive(f"{where}.c_puct", merged.get("c_puct", 1.5)),
        max_positions=_int(f"{where}.max_positions", merged.get("max_positions", limits.max_positions), 1, limits.max_positions),
    )


def _positive(field: str, value: Any) -> float:
    number = _number(field, value)
    if number <= 0 or number > 100:
        raise TaskError(field, f"must be in (0, 100], got {value!r}")
    return number


def task_work(task, limits: Limits) -> tuple[int, int]:
    """An upper bound on (env steps, MCTS simulations) the task can cost."""
    if task.backend == "libero":
        from pi0_reward_server.libero_backend import SETTLE_STEPS

        return task.episodes * (task.step_limit + SETTLE_STEPS), 0
    if isinstance(task, SelfPlayTask):
        from pi0_reward_server.selfplay.games import make_game

        longest = make_game(task.game, task.rows, task.cols).num_actions if task.game == "dots_boxes" else task.rows * task.cols
        return 0, task.games * task.simulations * longest
    import gymnasium

    steps = task.max_steps or gymnasium.envs.registry[task.env].max_episode_steps or limits.max_steps
    return task.episodes * min(steps, limits.max_steps), 0


def parse_libero(where: str, fields: dict[str, Any], defaults: Mapping[str, Any], limits: Limits):
    """``{"kind": "libero", "suite", "task_id", ...}`` or ``"libero:<suite>:<task_id>"``."""
    from pi0_reward_server import libero_backend

    merged = dict(defaults)
    reference = fields.get("task")
    if isinstance(reference, str) and reference.startswith("libero:"):
        parts = reference.split(":")
        if len(parts) != 3 or not re.fullmatch(r"[0-9]{1,9}", parts[2]):  # str.isdigit() also takes "²"
            raise TaskError(f"{where}.task", f"must look like 'libero:<suite>:<task_id>', got {reference!r}")
        merged.update(suite=parts[1], task_id=int(parts[2]))
    merged.update({k: v for k, v in fields.items() if k not in ("task", "kind")})
    suite = merged.get("suite")
    if not isinstance(suite, str) or suite not in libero_backend.SUITES:
        raise TaskError(f"{where}.suite", f"unknown LIBERO suite {suite!r}; known: {sorted(libero_backend.SUITES)}")
    n_tasks = libero_backend.SUITES[suite][0]
    task_id = _int(f"{where}.task_id", merged.get("task_id"), 0, n_tasks - 1)
    if not libero_backend.available():
        raise TaskError(where, "the LIBERO backend is not installed on this server: pip install '.[libero]' "
                               "(scripts/install_libero.sh)")
    max_steps = merged.get("max_steps")
    if max_steps is not None:
        max_steps = _int(f"{where}.max_steps", max_steps, 1, limits.max_steps)
    prompt = merged.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or len(prompt) > 4096):
        raise TaskError(f"{where}.prompt", "must be a string of at most 4096 characters")
    model = merged.get("model")
    if model is not None and (not isinstance(model, str) or not _MODEL_NAME.match(model)):
        raise TaskError(f"{where}.model", f"must be a hosted model's name, got {model!r}")
    return libero_backend.LiberoTask(
        name=str(reference or f"libero:{suite}:{task_id}"), suite=suite, task_id=task_id,
        episodes=_int(f"{where}.episodes", merged.get("episodes", limits.default_episodes), 1, limits.max_episodes),
        seed=_int(f"{where}.seed", merged.get("seed", 7), 0, 2**31 - 1),
        init_state=_int(f"{where}.init_state", merged.get("init_state", 0), 0, 10_000),
        max_steps=max_steps, prompt=prompt, model=model,
        replan_steps=_int(f"{where}.replan_steps", merged.get("replan_steps", libero_backend.REPLAN_STEPS), 1, 100),
    )
