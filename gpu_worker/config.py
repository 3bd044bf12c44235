"""Typed, validated server configuration (command line or TOML/JSON file)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import tomllib
from typing import Any

DEFAULT_MODELS = (
    "cartpole=gpu_worker.models.cartpole:CartPolePolicy",
    "libero_tiny=gpu_worker.models.libero_tiny:LiberoTinyPolicy",
    "connect4=gpu_worker.models.selfplay_net:Connect4Net",
    "dots_boxes_3x3=gpu_worker.models.selfplay_net:DotsBoxes3x3Net",
)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


class ConfigError(ValueError):
    """A configuration value a user must fix; the message says which and how."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    target: str  # "package.module:Class"
    checkpoint: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(f"model name {self.name!r} must be 1-64 letters, digits, '_', '-' or '.'")
        if not isinstance(self.target, str) or not _TARGET.match(self.target):
            raise ConfigError(f"model {self.name!r}: target {self.target!r} must look like 'package.module:ClassName'")
        if self.checkpoint is not None and not isinstance(self.checkpoint, str):
            raise ConfigError(f"model {self.name!r}: checkpoint must be a path string")
        if not isinstance(self.options, dict):
            raise ConfigError(f"model {self.name!r}: options must be a table/map of keyword arguments")

    @classmethod
    def parse(cls, text: str) -> "ModelConfig":
        """``NAME=module:Class`` or ``NAME=module:Class@CHECKPOINT``."""
        name, sep, rest = text.partition("=")
        if not sep:
            raise ConfigError(f"--model {text!r} must look like NAME=package.module:Class[@CHECKPOINT]")
        target, _, checkpoint = rest.partition("@")
        return cls(name=name.strip(), target=target.strip(), checkpoint=checkpoint.strip() or None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerConfig:
    # Network
    host: str = "127.0.0.1"
    port: int = 8000
    max_message_bytes: int = 64 * 2**20
    codec_offload_bytes: int = 64 * 1024  # frames/replies this large are (de)coded off the event loop
    max_connections: int = 1024
    api_key: str | None = None  # when set, WebSocket clients must send "Authorization: Api-Key <key>"
    metrics_public: bool = False  # GET /metrics without the API key (for a Prometheus on a private network)
    # Models
    models: tuple[ModelConfig, ...] = ()
    device: str = "auto"
    # Batching
    max_batch_size: int = 64
    # A batch with fewer requests than the last one waits for more, until as many are in as last time (callers
    # that wait for their answer come back together), no request has come for batch_gap_ms, or max_wait_ms
    # (at most one recent forward pass) has passed; a model whose forward pass is shorter than batch_gap_ms
    # never waits. 0 ms: an idle model runs whatever is queued at once; batches form while it is busy.
    max_wait_ms: float = 5.0
    batch_gap_ms: float = 0.3  # 0: wait out max_wait_ms
    max_queue: int = 1024
    # Lifecycle
    shutdown_grace_s: float = 30.0
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        models = self.models or tuple(ModelConfig.parse(m) for m in DEFAULT_MODELS)
        object.__setattr__(self, "models", tuple(models))
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"model names must be unique, got {duplicates} more than once")
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError("host must be a non-empty address such as 127.0.0.1 or 0.0.0.0")
        _check_int("port", self.port, 0, 65535)
        _check_int("max_message_bytes", self.max_message_bytes, 1024, 2**31)
        _check_int("max_connections", self.max_connections, 1, 1 << 20)
        _check_int("codec_offload_bytes", self.codec_offload_bytes, 0, 2**62)
        _check_int("max_batch_size", self.max_batch_size, 1, 1 << 16)
        _check_int("max_queue", self.max_queue, 1, 1 << 24)
        if not isinstance(self.max_wait_ms, (int, float)) or isinstance(self.max_wait_ms, bool) or not 0 <= self.max_wait_ms <= 1000:
            raise ConfigError(f"max_wait_ms must be between 0 and 1000, got {self.max_wait_ms!r}")
        if not isinstance(self.batch_gap_ms, (int, float)) or isinstance(self.batch_gap_ms, bool) or not 0 <= self.batch_gap_ms <= 1000:
            raise ConfigError(f"batch_gap_ms must be between 0 and 1000, got {self.batch_gap_ms!r}")
        if not isinstance(self.shutdown_grace_s, (int, float)) or self.shutdown_grace_s < 0:
            raise ConfigError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s!r}")
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            raise ConfigError(f"device {self.device!r} must be auto, cpu, cuda or cuda:N")
        if self.api_key is not None and (not isinstance(self.api_key, str) or len(self.api_key) < 8):
            raise ConfigError("api_key must be a string of at least 8 characters (or unset)")
        if not isinstance(self.metrics_public, bool):
            raise ConfigError(f"metrics_public must be true or false, got {self.metrics_public!r}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(f"log_level {self.log_level!r} must be one of {', '.join(LOG_LEVELS)}")
        object.__setattr__(self, "log_level", self.log_level.upper())

    @property
    def default_model(self) -> str:
        return self.models[0].name


def ws_url(host: str, port: int | None) -> str:
    """The URL a local client uses for a server bound to ``host``."""
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    return f"ws://[{host}]:{port}" if ":" in host else f"ws://{host}:{port}"


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer between {low} and {high}, got {value!r}")


_FIELDS = {f.name for f in dataclasses.fields(ServerConfig)}


def read_config_table(path: str | pathlib.Path) -> dict[str, Any]:
    """A TOML file (JSON when it ends in ``.json``) holding a table; errors name the file and the problem."""
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from exc
    try:
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a table/map at the top level")
    return raw


def load_config_file(path: str | pathlib.Path) -> dict[str, Any]:
    """Read a TOML (``.toml``) or JSON file into ServerConfig keyword arguments."""
    raw = read_config_table(path)
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise ConfigError(f"config file {str(path)!r}: unknown option(s) {unknown}; known: {sorted(_FIELDS)}")
    if "models" in raw:
        models = raw["models"]
        if not isinstance(models, list) or not all(isinstance(m, (dict, str)) for m in models):
            raise ConfigError(f"config file {str(path)!r}: models must be a list of tables with name, target, checkpoint, options")
        parsed = []
        for m in models:
            if isinstance(m, str):
                parsed.append(ModelConfig.parse(m))
                continue
            extra = sorted(set(m) - {"name", "target", "checkpoint", "options"})
            if extra or "name" not in m or "target" not in m:
                raise ConfigError(f"config file {str(path)!r}: model entry {m!r} needs name and target (and may have checkpoint, options)")
            parsed.append(ModelConfig(**m))
        raw["models"] = tuple(parsed)
    return raw
