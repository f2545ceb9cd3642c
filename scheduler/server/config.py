"""The server's configuration file (``scheduler.toml``, docs/server.md): parsed and
checked in full before it replaces a running configuration."""

from __future__ import annotations

import hashlib
import math
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from scheduler.errors import ConfigError
from scheduler.sglang_versions import DISAGG_PREFILL_DP_RANK_SINCE, SglangVersion

PREDICTION_MODES = ("none", "text", "probe", "conversation")
#: What an SGLang instance serves (SGLang's --disaggregation-mode; mixed: both phases).
ROLES = ("mixed", "prefill", "decode")

WORKER_KINDS = ("process", "thread")
#: Environment variables that override the secret files (Kubernetes Secrets).
ADMIN_TOKEN_ENV = "MOE_SCHEDULER_ADMIN_TOKEN"
OPENAI_API_KEY_ENV = "MOE_SCHEDULER_OPENAI_API_KEY"
BACKEND_API_KEY_ENV = "MOE_SCHEDULER_BACKEND_API_KEY"


@dataclass(frozen=True)
class ServerSection:
    listen: str = "127.0.0.1:50051"
    metrics_listen: str = "127.0.0.1:9464"
    max_queue: int = 4096
    max_prompt_chars: int = 200_000
    max_prompt_tokens: int = 32_768
    max_new_tokens: int = 8192
    max_stop_strings: int = 32
    max_stop_chars: int = 256
    #: Longest request_id, conversation_id and class_hint.
    max_id_chars: int = 128
    replicas: int = 1
    #: Generate calls admitted at once (more are RESOURCE_EXHAUSTED); 0: the queue plus
    #: every rank's capacity.
    max_concurrent_rpcs: int = 0
    #: New calls are RESOURCE_EXHAUSTED while the serving loop runs this late, averaged
    #: over about a second (it is out of CPU: taking more would only delay everything
    #: already running).
    max_loop_lag_ms: float = 250.0
    #: Streams: at most one message per this many ms after the first token (0: one per
    #: SGLang chunk, merged only while a write is in flight). Trades CPU for smoothness.
    stream_interval_ms: float = 0.0
    #: HTTP/2 streams one client connection may hold open; 0: the admission bound
    #: (max_concurrent_rpcs, or its default) plus room for admin calls, so that the
    #: scheduler's admission, not HTTP/2, refuses excess calls. HTTP/2 refuses a stream
    #: past this limit (REFUSED_STREAM, UNAVAILABLE at the client) before the scheduler
    #: sees it, so such calls are not counted.
    max_streams_per_connection: int = 0
    #: TLS: server certificate chain and key (PEM); with tls_client_ca, clients must
    #: present a certificate signed by it.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    #: File holding the bearer token of the admin RPCs ($MOE_SCHEDULER_ADMIN_TOKEN
    #: overrides it). Without one, admin RPCs answer PERMISSION_DENIED.
    admin_token_file: Path | None = None
    #: The OpenAI-compatible HTTP listener (host:port; port 0 picks a free one); "": off.
    openai_listen: str = ""
    #: File holding the API key OpenAI clients must send as ``Authorization: Bearer``
    #: ($MOE_SCHEDULER_OPENAI_API_KEY overrides it); without one the listener is open.
    openai_api_key_file: Path | None = None


@dataclass(frozen=True)
class BackendSection:
    url: str = ""
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 600.0
    health_interval_s: float = 1.0
    #: Re-dispatches after a rank answered an error, before the first token.
    retries: int = 2
    #: Backoff between attempts (full jitter, doubling up to the max), within the deadline.
    retry_backoff_s: float = 0.05
    retry_backoff_max_s: float = 1.0
    #: While SGLang cannot be reached at all (a restart), keep retrying this long.
    unreachable_retry_s: float = 30.0
    return_routed_experts: bool = True
    #: Ask for routed experts on at most this share of requests ...
    routed_experts_fraction: float = 1.0
    #: ... and only as often as decoding them costs at most this share of one core
    #: (0: no CPU limit).
    routed_experts_budget_cores: float = 0.1
    #: Seconds a failed rank stays out before it is tried again.
    failed_rank_cooldown_s: float = 5.0
    #: File holding SGLang's --api-key ($MOE_SCHEDULER_BACKEND_API_KEY overrides it).
    api_key_file: Path | None = None
    #: The single instance's SGLang version ("": read from its /server_info).
    sglang_version: str = ""


@dataclass(frozen=True)
class InstanceSection:
    """One SGLang instance (a ``[[backend.instances]]`` table; the single-instance form
    ``backend.url`` + ``[cluster]`` is one of these too)."""

    url: str = ""
    placement: Path = Path()
    topology: Path | None = None
    model: str | None = None
    #: "" : read from the instance's /server_info.
    sglang_version: str = ""
    role: str = "mixed"
    #: Label in metrics, stats and logs ("": the URL's host:port).
    name: str = ""
    #: A prefill instance's --disaggregation-bootstrap-port (sent to decode as
    #: bootstrap_port); 0: from its /server_info, else SGLang's default 8998.
    bootstrap_port: int = 0


@dataclass(frozen=True)
class ClusterSection:
    placement: Path = Path()
    topology: Path | None = None
    model: str | None = None
    #: Expected placement fingerprint (``serve`` prints it); empty: any. The environment
    #: variable MOE_SCHEDULER_PLACEMENT_VERSION sets it too (Kubernetes downward API).
    placement_version: str = ""
    #: The model's vocabulary size: token-id prompts are checked against it (0: unknown).
    vocab_size: int = 0


@dataclass(frozen=True)
class PolicySection:
    name: str = "locality_window"
    capacity: int = 32
    window_ms: float = 2.0
    max_window: int = 256
    band: float = 0.1
    #: locality_window: weight of the busiest rank's predicted inter-node pairs against
    #: the mean's, in [0, 1] (docs/policies.md).
    balance: float = 0.5


@dataclass(frozen=True)
class PredictionSection:
    mode: str = "text"
    bundle: Path | None = None
    #: Workload profile whose per-class expert counts are the predicted histograms.
    profile: Path | None = None
    #: Predicted domain -> plan class; default: the emulator's convention (docs/emulator.md).
    class_map: dict[str, str] = field(default_factory=dict)
    probe_min_new_tokens: int = 256
    #: The text classifier reads at most this many characters of a prompt.
    max_text_chars: int = 4096


@dataclass(frozen=True)
class FeedbackSection:
    dir: Path | None = None
    #: Seconds between writes of the feedback profile.
    flush_interval_s: float = 10.0
    #: Prompts kept for the predictors' training buffer.
    buffer_size: int = 10_000
    #: Where routed experts are decoded and accounted: a worker process (default) or a
    #: thread of the server's process.
    worker: str = "process"
    #: Requests waiting for the worker; beyond it their telemetry is dropped (counted).
    max_pending: int = 64


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
    #: Every SGLang instance behind the scheduler, in rank order (mixed, prefill, decode).
    instances: tuple[InstanceSection, ...] = ()
    #: The instances came from [[backend.instances]] (else from backend.url + [cluster]).
    instance_tables: bool = False

    @property
    def disaggregated(self) -> bool:
        return any(i.role != "mixed" for i in self.instances)


_SECTIONS: dict[str, type] = {
    "server": ServerSection,
    "backend": BackendSection,
    "cluster": ClusterSection,
    "policy": PolicySection,
    "prediction": PredictionSection,
    "feedback": FeedbackSection,
}
_PATH_KEYS = {
    ("server", "tls_cert"),
    ("server", "tls_key"),
    ("server", "tls_client_ca"),
    ("server", "admin_token_file"),
    ("server", "openai_api_key_file"),
    ("backend", "api_key_file"),
    ("cluster", "placement"),
    ("cluster", "topology"),
    ("instance", "placement"),
    ("instance", "topology"),
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
        raise ConfigError(f"{path}: {e}") from e
    unknown = set(data) - set(_SECTIONS)
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}")
    backend = data.get("backend", {})
    tables = backend.pop("instances", None) if isinstance(backend, dict) else None
    sections = {
        name: _section(path, name, cls, data.get(name, {})) for name, cls in _SECTIONS.items()
    }
    config = ServerConfig(path=path, version=hashlib.sha256(raw).hexdigest()[:12], **sections)
    config = replace(config, instances=_instances(config, tables), instance_tables=bool(tables))
    _check(config)
    return config


def _instances(c: ServerConfig, tables: Any) -> tuple[InstanceSection, ...]:
    """The instances of ``[[backend.instances]]``, or the single one of ``backend.url``
    and ``[cluster]``; sorted by role (stable), so that each role's ranks are contiguous."""
    if tables is None:
        b, k = c.backend, c.cluster
        single = InstanceSection(b.url, k.placement, k.topology, k.model, b.sglang_version)
        return (replace(single, name=_default_name(single.url)),)
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{c.path}: backend.instances must be [[backend.instances]] tables")
    if c.backend.url or c.cluster.placement != Path() or c.cluster.topology or c.cluster.model:
        raise ConfigError(
            f"{c.path}: give either backend.url with [cluster] placement/topology/model (one "
            "instance) or [[backend.instances]] tables (each with url and placement), not both"
        )
    out = []
    for i, table in enumerate(tables):
        where = f"backend.instances[{i}]"
        inst = _section(c.path, where, InstanceSection, table)
        for key in ("url", "placement"):
            if key not in table:
                raise ConfigError(f"{c.path}: {where} needs {key}")
        if inst.role not in ROLES:
            raise ConfigError(f"{c.path}: {where}.role must be one of {', '.join(ROLES)}")
        out.append(replace(inst, name=inst.name or _default_name(inst.url)))
    return tuple(sorted(out, key=lambda inst: ROLES.index(inst.role)))


def _default_name(url: str) -> str:
    parsed = urlsplit(url)
    return parsed.netloc or url


def _section(path: Path, name: str, cls: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown key {name}.{key}; known: {', '.join(known)}")
        default = getattr(cls(), key)
        if (name.partition("[")[0].replace("backend.instances", "instance"), key) in _PATH_KEYS:
            if value == "" and default is None:  # an optional file, left unset
                kwargs[key] = None
                continue
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
            if not math.isfinite(value):
                raise ConfigError(f"{path}: {name}.{key} must be a finite number, got {value!r}")
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

    for i, inst in enumerate(c.instances):
        where = f"backend.instances[{i}]" if c.instance_tables else "backend"
        if not inst.url.startswith(("http://", "https://")):
            fail(
                f"{where}.url must be an http:// or https:// URL of SGLang (node 0) or the emulator"
            )
        if inst.placement == Path():
            where = where if c.instance_tables else "cluster"
            fail(f"{where}.placement is required (a directory written by `moe-scheduler place`)")
        if inst.sglang_version:
            try:
                version = SglangVersion.parse(inst.sglang_version, f"{where}.sglang_version")
            except ConfigError as e:
                fail(str(e))
            if inst.role == "decode" and version < DISAGG_PREFILL_DP_RANK_SINCE:
                fail(decode_too_old(inst.name, version))
        if not 0 <= inst.bootstrap_port <= 65535:
            fail(f"{where}.bootstrap_port must be a port number, got {inst.bootstrap_port}")
    for key in ("name", "url"):
        values = [getattr(inst, key) for inst in c.instances]
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            fail(f"backend.instances: {key} {', '.join(repeated)} given more than once")
    roles = {inst.role for inst in c.instances}
    if roles - {"mixed"} and roles != {"prefill", "decode"}:
        fail(
            "backend.instances: prefill/decode disaggregation needs at least one prefill and one "
            f"decode instance and no mixed one (roles given: {', '.join(sorted(roles))})"
        )
    for key in ("listen", "metrics_listen", "openai_listen"):
        value = getattr(c.server, key)
        if key == "openai_listen" and not value:
            continue
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
        "feedback.max_pending": c.feedback.max_pending,
        "server.max_stop_strings": c.server.max_stop_strings,
        "server.max_stop_chars": c.server.max_stop_chars,
        "server.max_id_chars": c.server.max_id_chars,
        "server.max_loop_lag_ms": c.server.max_loop_lag_ms,
        "backend.retry_backoff_max_s": c.backend.retry_backoff_max_s,
        "prediction.max_text_chars": c.prediction.max_text_chars,
    }
    for key, value in positive.items():
        if not value > 0:
            fail(f"{key} must be > 0, got {value}")
    for key, value in {
        "backend.retries": c.backend.retries,
        "backend.failed_rank_cooldown_s": c.backend.failed_rank_cooldown_s,
        "policy.window_ms": c.policy.window_ms,
        "prediction.probe_min_new_tokens": c.prediction.probe_min_new_tokens,
        "server.max_concurrent_rpcs": c.server.max_concurrent_rpcs,
        "server.max_streams_per_connection": c.server.max_streams_per_connection,
        "server.stream_interval_ms": c.server.stream_interval_ms,
        "backend.retry_backoff_s": c.backend.retry_backoff_s,
        "backend.unreachable_retry_s": c.backend.unreachable_retry_s,
        "backend.routed_experts_budget_cores": c.backend.routed_experts_budget_cores,
        "cluster.vocab_size": c.cluster.vocab_size,
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
    if not 0 <= c.backend.routed_experts_fraction <= 1:
        fail("backend.routed_experts_fraction must be in [0, 1]")
    if not 0 <= c.policy.balance <= 1:
        fail(f"policy.balance must be in [0, 1], got {c.policy.balance}")
    if c.feedback.worker not in WORKER_KINDS:
        fail(f"feedback.worker must be one of {', '.join(WORKER_KINDS)}")
    if (c.server.tls_cert is None) != (c.server.tls_key is None):
        fail("server.tls_cert and server.tls_key go together")
    if c.server.tls_client_ca is not None and c.server.tls_cert is None:
        fail("server.tls_client_ca needs server.tls_cert and server.tls_key")


def decode_too_old(name: str, version: SglangVersion) -> str:
    return (
        f"decode instance {name} runs SGLang {version}: before "
        f"{DISAGG_PREFILL_DP_RANK_SINCE} a decode server has no disagg_prefill_dp_rank and "
        "looks for the KV on the prefill rank numbered like its own DP rank, so the "
        "scheduler cannot pair ranks freely; upgrade the decode instances"
    )


def read_secret(path: Path | None, env: str, what: str) -> str:
    """A secret from environment variable ``env``, else the first line of ``path``
    ("" when neither is set); ConfigError when the file cannot be read."""
    value = os.environ.get(env, "").strip()
    if value or path is None:
        return value
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path}: {e}") from e
