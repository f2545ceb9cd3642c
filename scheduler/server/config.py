"""The server's configuration file (``scheduler.toml``, docs/server.md): parsed and
checked in full before it replaces a running configuration."""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from scheduler.errors import ConfigError

PREDICTION_MODES = ("none", "text", "probe", "conversation")


@dataclass(frozen=True)
class ServerSection:
    listen: str = "127.0.0.1:50051"
    metrics_listen: str = "127.0.0.1:9464"
    max_queue: int = 4096
    max_prompt_chars: int = 200_000
    max_prompt_tokens: int = 32_768
    max_new_tokens: int = 8192
    replicas: int = 1


@dataclass(frozen=True)
class BackendSection:
    url: str = ""
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 600.0
    health_interval_s: float = 1.0
    retries: int = 2
    return_routed_experts: bool = True
    #: Seconds a failed rank stays out before it is tried again.
    failed_rank_cooldown_s: float = 5.0


@dataclass(frozen=True)
class ClusterSection:
    placement: Path = Path()
    topology: Path | None = None
    model: str | None = None
    #: Expected placement fingerprint (``serve`` prints it); empty: any. The environment
    #: variable MOE_SCHEDULER_PLACEMENT_VERSION sets it too (Kubernetes downward API).
    placement_version: str = ""


@dataclass(frozen=True)
class PolicySection:
    name: str = "locality_window"
    capacity: int = 32
    window_ms: float = 2.0
    max_window: int = 256
    band: float = 0.1


@dataclass(frozen=True)
class PredictionSection:
    mode: str = "text"
    bundle: Path | None = None
    #: Workload profile whose per-class expert counts are the predicted histograms.
    profile: Path | None = None
    #: Predicted domain -> plan class; default: the emulator's convention (docs/emulator.md).
    class_map: dict[str, str] = field(default_factory=dict)
    probe_min_new_tokens: int = 256


@dataclass(frozen=True)
class FeedbackSection:
    dir: Path | None = None
    #: Seconds between writes of the feedback profile.
    flush_interval_s: float = 10.0
    #: Prompts kept for the predictors' training buffer.
    buffer_size: int = 10_000


@dataclass(frozen=True)
class ServerConfig:
    path: Path
    version: str
    server: ServerSection
    backend: BackendSection
    cluster: ClusterSection
    policy: PolicySection
    prediction: PredictionSection
    feedback: FeedbackSection


_SECTIONS: dict[str, type] = {
    "server": ServerSection,
    "backend": BackendSection,
    "cluster": ClusterSection,
    "policy": PolicySection,
    "prediction": PredictionSection,
    "feedback": FeedbackSection,
}
_PATH_KEYS = {
    ("cluster", "placement"),
    ("cluster", "topology"),
    ("prediction", "bundle"),
    ("prediction", "profile"),
    ("feedback", "dir"),
}


def load_config(path: Path) -> ServerConfig:
    """Read and check ``path``; ConfigError names the file, key and problem."""
    try:
        raw = path.read_bytes()
        data = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    unknown = set(data) - set(_SECTIONS)
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}")
    sections = {
        name: _section(path, name, cls, data.get(name, {})) for name, cls in _SECTIONS.items()
    }
    config = ServerConfig(path=path, version=hashlib.sha256(raw).hexdigest()[:12], **sections)
    _check(config)
    return config


def _section(path: Path, name: str, cls: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown key {name}.{key}; known: {', '.join(known)}")
        default = getattr(cls(), key)
        if (name, key) in _PATH_KEYS:
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{path}: {name}.{key} must be a path string")
            value = (path.parent / value).resolve()
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: {name}.{key} must be true or false")
        elif isinstance(default, int | float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{path}: {name}.{key} must be a number, got {value!r}")
            if isinstance(default, int) and not isinstance(value, int):
                raise ConfigError(f"{path}: {name}.{key} must be an integer, got {value!r}")
        elif isinstance(default, dict):
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise ConfigError(f"{path}: {name}.{key} must be a table of strings")
        elif not isinstance(value, str):
            raise ConfigError(f"{path}: {name}.{key} must be a string, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def _check(c: ServerConfig) -> None:
    def fail(message: str) -> None:
        raise ConfigError(f"{c.path}: {message}")

    if not c.backend.url.startswith(("http://", "https://")):
        fail("backend.url must be an http:// or https:// URL of SGLang (node 0) or the emulator")
    if c.cluster.placement == Path():
        fail("cluster.placement is required (a directory written by `moe-scheduler place`)")
    for key in ("listen", "metrics_listen"):
        value = getattr(c.server, key)
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            fail(f"server.{key} must be HOST:PORT, got {value!r}")
    positive = {
        "server.max_queue": c.server.max_queue,
        "server.max_prompt_chars": c.server.max_prompt_chars,
        "server.max_prompt_tokens": c.server.max_prompt_tokens,
        "server.max_new_tokens": c.server.max_new_tokens,
        "server.replicas": c.server.replicas,
        "backend.connect_timeout_s": c.backend.connect_timeout_s,
        "backend.request_timeout_s": c.backend.request_timeout_s,
        "backend.health_interval_s": c.backend.health_interval_s,
        "policy.capacity": c.policy.capacity,
        "policy.max_window": c.policy.max_window,
        "feedback.flush_interval_s": c.feedback.flush_interval_s,
        "feedback.buffer_size": c.feedback.buffer_size,
    }
    for key, value in positive.items():
        if not value > 0:
            fail(f"{key} must be > 0, got {value}")
    for key, value in {
        "backend.retries": c.backend.retries,
        "backend.failed_rank_cooldown_s": c.backend.failed_rank_cooldown_s,
        "policy.window_ms": c.policy.window_ms,
        "prediction.probe_min_new_tokens": c.prediction.probe_min_new_tokens,
    }.items():
        if value < 0:
            fail(f"{key} must be >= 0, got {value}")
    if c.policy.capacity < c.server.replicas:
        fail(
            f"policy.capacity {c.policy.capacity} cannot be split over {c.server.replicas} replicas"
        )
    if c.prediction.mode not in PREDICTION_MODES:
        fail(f"prediction.mode must be one of {', '.join(PREDICTION_MODES)}")
    if c.prediction.mode in ("text", "probe") and c.prediction.bundle is None:
        fail(f"prediction.mode {c.prediction.mode!r} needs prediction.bundle (moe-scheduler fit)")
