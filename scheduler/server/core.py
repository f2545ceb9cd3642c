"""The scheduler's request path, independent of gRPC: validate, predict, take a rank slot,
dispatch to SGLang (retrying with backoff before the first token), relay the answer.

Several SGLang instances can stand behind one scheduler (``cluster.py``): a mixed fleet
(each request runs on one (instance, rank)) or a prefill/decode disaggregated one (each
request gets a prefill (instance, rank) and a decode (instance, rank), chosen at arrival,
and both legs are sent at once with the same ``bootstrap_room``, as sgl-router's PD mode
sends them). An instance that stops answering is taken out as a whole (SGLang fails per
instance, not per rank); requests that have sent no token go to another instance.

The serving loop only relays and decides. The routed experts that come back (asked for
on a sampled share of requests, ``telemetry.RoutedSampler``) are decoded and accounted by
the telemetry worker; a full worker drops telemetry, never the request. The gRPC
service (``service.py``) maps :class:`RequestError` outcomes to status codes and counts
every call once."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from scheduler.errors import (
    BackendError,
    BackendRejected,
    BackendUnreachable,
    MoeSchedulerError,
    RankFailed,
    RequestError,
)
from scheduler.policies import RequestInfo, RoutingPolicy, make_policy
from scheduler.server.backend import GENERATE, Answer, SGLangBackend
from scheduler.server.cluster import ClusterState, InstanceState, load_cluster
from scheduler.server.config import (
    ADMIN_TOKEN_ENV,
    BACKEND_API_KEY_ENV,
    OPENAI_API_KEY_ENV,
    ServerConfig,
    decode_too_old,
    load_config,
    read_secret,
)
from scheduler.server.dispatcher import Dispatcher
from scheduler.server.feedback import Feedback
from scheduler.server.feedback import write as write_feedback
from scheduler.server.metrics import OUTCOMES, ServerMetrics
from scheduler.server.predict import Prediction, RequestPredictor
from scheduler.server.telemetry import (
    MeasureContext,
    Observation,
    RoutedSampler,
    TelemetryWorker,
)
from scheduler.server.wire import OpenAIEvents
from scheduler.sglang_versions import (
    DEFAULT_BOOTSTRAP_PORT,
    DISAGG_PREFILL_DP_RANK_SINCE,
    OPENAI_DP_RANK_SINCE,
    OPENAI_ROUTED_EXPERTS_SINCE,
    SglangVersion,
    rank_field,
)

log = logging.getLogger("moe_scheduler.server")

#: Tokens assumed for a request that does not say max_new_tokens (SGLang's default).
DEFAULT_NEW_TOKENS = 128


#: Longest user-supplied value quoted back in an error message.
_QUOTE_CHARS = 40
#: Health rounds in a row whose /health times out before an instance is taken out (a
#: busy instance answers late; a dead one refuses or resets, and is out at once).
SLOW_HEALTH_ROUNDS = 3
#: Seconds a reply waits for its own telemetry (local_fraction, inter_node_bytes).
REPLY_TELEMETRY_WAIT_S = 0.25
#: Seconds over which the loop's lateness is averaged for ``server.max_loop_lag_ms``.
LOOP_LAG_WINDOW_S = 1.0


def smoothed_lag(previous_s: float, late_s: float, elapsed_s: float) -> float:
    """The loop's lateness averaged over about :data:`LOOP_LAG_WINDOW_S`: each probe that
    took ``elapsed_s`` (and ran ``late_s`` late) weighs ``elapsed_s / window``. A loop
    that stays late is seen within about a second; one slow callback, or a moment when
    another process has the CPU, moves the average by its share of the window only."""
    weight = min(1.0, max(0.0, elapsed_s) / LOOP_LAG_WINDOW_S)
    return previous_s + weight * (max(0.0, late_s) - previous_s)


def quote(value: object) -> str:
    """``value`` for an error message or log line: repr, bounded, one line."""
    text = repr(value)
    return text if len(text) <= _QUOTE_CHARS else text[: _QUOTE_CHARS - 3] + "..."


@dataclass
class Job:
    request_id: str
    text: str | None
    input_ids: list[int] | None
    sampling: dict[str, Any]
    class_hint: str
    conversation_id: str
    prompt_tokens: int
    arrived: float = field(default_factory=time.monotonic)
    #: The SGLang endpoint (backend.GENERATE, CHAT or COMPLETIONS). For an OpenAI one,
    #: ``openai`` is the body to forward (without ``stream`` and the fields the scheduler
    #: sets) and ``text`` what prediction reads.
    endpoint: str = GENERATE
    openai: dict[str, Any] | None = None

    @property
    def max_new_tokens(self) -> int:
        return int(self.sampling.get("max_new_tokens", DEFAULT_NEW_TOKENS))


@dataclass
class Outcome:
    """``rank``: the fleet rank that answered (the decode rank when disaggregated);
    ``dp_rank`` / ``node``: its SGLang DP rank and node within ``instance``."""

    request_id: str
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    rank: int = -1
    dp_rank: int = -1
    node: int = -1
    instance: str = ""
    #: Disaggregated: the prefill leg's instance and SGLang DP rank.
    prefill_instance: str = ""
    prefill_dp_rank: int = -1
    predicted_class: str = ""
    prediction_source: str = "none"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    queue_seconds: float = 0.0
    ttft_seconds: float = 0.0
    total_seconds: float = 0.0
    attempts: int = 0
    local_fraction: float | None = None
    inter_node_bytes: float | None = None
    #: An OpenAI endpoint's unary answer as the client gets it.
    body: bytes = b""


#: Streamed /generate: called with the new (text, token ids) of each chunk.
Chunk = Callable[[str, list[int]], Awaitable[None]]
#: Streamed OpenAI endpoint: called with the new text and the event to relay (or None).
EventChunk = Callable[[str, bytes | None], Awaitable[None]]


def build_policy(
    config: ServerConfig, cluster: ClusterState, role: str | None = None
) -> RoutingPolicy:
    """The configured policy of the pool of ``role`` (default: the pool that answers the
    client), given whichever of the pool's facts its constructor takes. A prefill pool's
    policy weighs requests by their prompt tokens (what a prefill pass computes)."""
    pool = cluster.pools[role] if role is not None else cluster.serving_pool
    return make_policy(
        config.policy.name,
        placement=pool.placement,
        class_to_node_share=pool.class_to_node_share,
        band=config.policy.band,
        balance=config.policy.balance,
        weight="prefill" if pool.role == "prefill" else "decode",
    )


def estimate_tokens(text: str) -> int:
    """A prompt's tokens before SGLang tokenizes it: about 4 bytes of UTF-8 per token."""
    return max(1, math.ceil(len(text.encode("utf-8", "replace")) / 4))


def validate(config: ServerConfig, cluster: ClusterState, request: dict[str, Any]) -> Job:
    """A :class:`Job` from a request's fields, or RequestError("invalid", what is wrong).

    ``request``: ``request_id``, ``text`` or ``input_ids``, ``sampling`` (dict of the set
    fields), ``class_hint``, ``conversation_id``. Messages quote user values bounded.
    """
    s = config.server

    def bad(message: str) -> RequestError:
        return RequestError("invalid", message)

    for key in ("request_id", "conversation_id", "class_hint"):
        value = request.get(key) or ""
        if len(value) > s.max_id_chars:
            raise bad(f"{key} has {len(value)} characters; the limit is {s.max_id_chars}")
        if not value.isprintable():
            raise bad(f"{key} {quote(value)} holds control characters")
    text, ids = request.get("text"), request.get("input_ids")
    if text is None and ids is None:
        raise bad("the request has no prompt: set text or input_ids")
    if text is not None:
        if len(text) > s.max_prompt_chars:
            raise bad(f"the prompt has {len(text)} characters; the limit is {s.max_prompt_chars}")
        if not text.strip():
            raise bad("the prompt text is empty")
        prompt_tokens = estimate_tokens(text)
    else:
        assert ids is not None
        if not ids:
            raise bad("input_ids is empty")
        if len(ids) > s.max_prompt_tokens:
            raise bad(f"the prompt has {len(ids)} tokens; the limit is {s.max_prompt_tokens}")
        if min(ids) < 0:
            raise bad("input_ids holds a negative token id")
        vocab = config.cluster.vocab_size
        if vocab and max(ids) >= vocab:
            raise bad(f"input_ids holds token id {max(ids)}; the vocabulary has {vocab}")
        prompt_tokens = len(ids)
    sampling = dict(request.get("sampling", {}))
    if "max_new_tokens" in sampling and not 1 <= sampling["max_new_tokens"] <= s.max_new_tokens:
        raise bad(
            f"max_new_tokens must be in [1, {s.max_new_tokens}], got {sampling['max_new_tokens']}"
        )
    if "temperature" in sampling and not (
        math.isfinite(sampling["temperature"]) and sampling["temperature"] >= 0
    ):
        raise bad(f"temperature must be >= 0, got {sampling['temperature']}")
    if "top_p" in sampling and not 0 < sampling["top_p"] <= 1:
        raise bad(f"top_p must be in (0, 1], got {sampling['top_p']}")
    if "top_k" in sampling and not (sampling["top_k"] == -1 or sampling["top_k"] >= 1):
        raise bad(f"top_k must be -1 (off) or >= 1, got {sampling['top_k']}")
    stops = sampling.get("stop", [])
    if len(stops) > s.max_stop_strings:
        raise bad(f"{len(stops)} stop strings; the limit is {s.max_stop_strings}")
    for stop in stops:
        if not stop:
            raise bad("stop strings must not be empty")
        if len(stop) > s.max_stop_chars:
            raise bad(f"a stop string has {len(stop)} characters; the limit is {s.max_stop_chars}")
    hint = request.get("class_hint", "")
    classes = set(cluster.class_to_node_share) | set(cluster.class_shares)
    if hint and hint not in classes:
        raise bad(
            f"unknown class_hint {quote(hint)}; the plan's classes are "
            f"{quote(', '.join(sorted(classes)))}"
        )
    return Job(
        request_id=request.get("request_id") or uuid.uuid4().hex,
        text=text,
        input_ids=ids,
        sampling=sampling,
        class_hint=hint,
        conversation_id=request.get("conversation_id", ""),
        prompt_tokens=prompt_tokens,
    )


def measure_context(cluster: ClusterState) -> MeasureContext:
    return MeasureContext(
        cluster.model, cluster.topology, cluster.placement, cluster.dest_gpu, cluster.node_present
    )


def max_event_bytes(config: ServerConfig, cluster: ClusterState) -> int:
    """The largest streamed event SGLang can send for the longest allowed request: its
    routed experts in base64 (4 bytes per id, 4/3 for base64), its text and ids escaped
    (at most 6 bytes per character, 12 per id) and 1 MiB of the rest."""
    s, m = config.server, cluster.model
    tokens = max(s.max_prompt_tokens, s.max_prompt_chars) + s.max_new_tokens
    routed = tokens * m.num_hidden_layers * m.top_k * 4 * 4 // 3
    return routed + s.max_new_tokens * (6 * 16 + 12) + (1 << 20)


class SchedulerCore:
    """One running configuration and everything that serves it."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.cluster = load_cluster(config)
        self.metrics = ServerMetrics()
        self.backends = self._backends(config, self.cluster)
        self.dispatchers = {
            role: Dispatcher(
                build_policy(config, self.cluster, role),
                pool.num_ranks,
                self.cluster.topology.gpus_per_node,
                self.capacity_share(config),
                window_s=config.policy.window_ms / 1000,
                max_window=config.policy.max_window,
                max_queue=config.server.max_queue,
                cooldown_s=config.backend.failed_rank_cooldown_s,
            )
            for role, pool in self.cluster.pools.items()
        }
        #: Per instance: whether its /health answers, the SGLang version it runs (from
        #: the configuration or its /server_info) and its bootstrap port (prefill).
        self.instance_up = {i.name: False for i in self.cluster.instances}
        #: Monotonic time each instance was seen going down (None: up).
        now = time.monotonic()
        self.down_since: dict[str, float | None] = dict.fromkeys(self.instance_up, now)
        self.sglang_versions: dict[str, SglangVersion | None] = {
            i.name: i.sglang_version for i in self.cluster.instances
        }
        self.bootstrap_ports = {i.name: i.bootstrap_port for i in self.cluster.instances}
        #: Health rounds in a row whose /health did not answer in time, per instance.
        self.slow_rounds = dict.fromkeys(self.instance_up, 0)
        #: Instances that answer but cannot be used, and why (kept out of service).
        self.refused: dict[str, str] = {}
        self.predictor = RequestPredictor(self.cluster)
        self.feedback = Feedback(self.cluster, config.feedback.buffer_size)
        self.telemetry = self._telemetry(config, self.cluster)
        self.sampler = self._sampler(config)
        self.max_event_bytes = max_event_bytes(config, self.cluster)
        self.admin_token = self._admin_token(config)
        self.openai_api_key = self._openai_api_key(config)
        self.started = time.monotonic()
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        #: Each instance's --served-model-name, from its /server_info.
        self.served_models: dict[str, str] = {}
        self._warned: set[str] = set()
        self.in_progress = 0
        self.loop_lag_s = 0.0
        self.probes = 0
        self.estimated_inter_node_bytes = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._reload_lock = asyncio.Lock()
        self.on_health: Callable[[bool], None] = lambda serving: None

    @staticmethod
    def capacity_share(config: ServerConfig) -> int:
        return config.policy.capacity // config.server.replicas

    @property
    def dispatcher(self) -> Dispatcher:
        """The dispatcher of the pool that answers the client (mixed, or decode)."""
        return self.dispatchers[self.cluster.serving_pool.role]

    @property
    def backend_healthy(self) -> bool:
        """Every pool has an instance whose /health answers."""
        return all(
            any(self.instance_up[i.name] for i in pool.instances)
            for pool in self.cluster.pools.values()
        )

    def _dead_pool(self, role: str) -> RequestError | None:
        """The error of requests for ``role`` once none of its instances has answered
        for backend.unreachable_retry_s (before: they wait for one to come back)."""
        down = self.pool_down_for(role)
        if down <= self.config.backend.unreachable_retry_s:
            return None
        return RequestError(
            "backend_error",
            f"no {role} instance has answered for {down:.0f} s (backend.unreachable_retry_s)",
        )

    def _fail_queued_of_dead_pools(self) -> None:
        for role, dispatcher in self.dispatchers.items():
            if dispatcher.queued and (error := self._dead_pool(role)) is not None:
                log.warning("%s: failing %d queued requests", error, dispatcher.fail_queued(error))

    def pool_down_for(self, role: str) -> float:
        """Seconds every instance of ``role`` has been down (0 while one is up)."""
        times = [self.down_since[i.name] for i in self.cluster.pools[role].instances]
        if any(t is None for t in times):
            return 0.0
        return time.monotonic() - max(t for t in times if t is not None)

    @staticmethod
    def _backends(config: ServerConfig, cluster: ClusterState) -> dict[str, SGLangBackend]:
        key = read_secret(config.backend.api_key_file, BACKEND_API_KEY_ENV, "backend.api_key_file")
        return {
            i.name: SGLangBackend(i.url, config.backend.connect_timeout_s, key)
            for i in cluster.instances
        }

    @staticmethod
    def _openai_api_key(config: ServerConfig) -> str:
        s = config.server
        return read_secret(s.openai_api_key_file, OPENAI_API_KEY_ENV, "server.openai_api_key_file")

    @staticmethod
    def _admin_token(config: ServerConfig) -> str:
        return read_secret(
            config.server.admin_token_file, ADMIN_TOKEN_ENV, "server.admin_token_file"
        )

    @staticmethod
    def _telemetry(config: ServerConfig, cluster: ClusterState) -> TelemetryWorker:
        f = config.feedback
        return TelemetryWorker(measure_context(cluster), f.worker, f.max_pending)

    @staticmethod
    def _sampler(config: ServerConfig) -> RoutedSampler:
        b = config.backend
        fraction = b.routed_experts_fraction if b.return_routed_experts else 0.0
        return RoutedSampler(b.routed_experts_budget_cores, fraction)

    def max_in_progress(self) -> int:
        s = self.config.server
        if s.max_concurrent_rpcs:
            return s.max_concurrent_rpcs
        ranks = self.cluster.serving_pool.num_ranks
        return s.max_queue + ranks * self.capacity_share(self.config)

    def refuse_new_call(self) -> str | None:
        """Why a new call cannot be admitted now, or None."""
        if self.in_progress >= self.max_in_progress():
            return f"{self.in_progress} calls in progress (server.max_concurrent_rpcs)"
        lag_ms = 1000 * self.loop_lag_s
        if lag_ms > self.config.server.max_loop_lag_ms:
            return (
                f"the serving loop runs {lag_ms:.0f} ms late (server.max_loop_lag_ms): out of CPU"
            )
        return None

    @property
    def requests_ok(self) -> int:
        return self.outcomes["ok"]

    @property
    def requests_failed(self) -> int:
        return sum(self.outcomes.values()) - self.outcomes["ok"]

    def count(self, outcome: str) -> None:
        """One finished call (the service calls it once per call, after the reply)."""
        self.outcomes[outcome] += 1
        self.metrics.outcome[outcome].inc()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await asyncio.to_thread(self.telemetry.warm)
        for dispatcher in self.dispatchers.values():
            dispatcher.start()
        # The first health round (versions, bootstrap ports) before the first request.
        await asyncio.gather(*(self._poll_once(i) for i in self.cluster.instances))
        loop = asyncio.get_running_loop()
        for inst in self.cluster.instances:
            self._tasks.append(
                loop.create_task(self._poll_instance(inst.name), name=f"poll-{inst.name}")
            )
        self._tasks.append(loop.create_task(self._watch_loop(), name="watch-loop"))
        if self.config.feedback.dir is not None:
            self._tasks.append(loop.create_task(self._flush_feedback(), name="flush-feedback"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for dispatcher in self.dispatchers.values():
            await dispatcher.stop()
        await asyncio.to_thread(self.telemetry.close)
        if self.config.feedback.dir is not None:
            await asyncio.to_thread(
                write_feedback, self.config.feedback.dir, *self.feedback.snapshot()
            )
        for backend in self.backends.values():
            await backend.close()

    def pool_ranks(self, inst: InstanceState) -> range:
        """The instance's ranks in its pool's numbering."""
        start = inst.first_rank - self.cluster.pools[inst.role].first_rank
        return range(start, start + inst.num_ranks)

    def _instance_down(self, inst: InstanceState, why: str) -> None:
        """Take the whole instance out (SGLang fails per instance); the health poll brings
        it back when /health answers again."""
        was_serving = self.backend_healthy
        if self.instance_up[inst.name]:
            log.warning("instance %s (%s) is DOWN: %s", inst.name, inst.url, why)
            self.down_since[inst.name] = time.monotonic()
        self.instance_up[inst.name] = False
        # Out until the next health round could see it back (renewed while it stays down).
        hold = max(2 * self.config.backend.health_interval_s, 1.0)
        self.dispatchers[inst.role].mark_out(self.pool_ranks(inst), hold)
        if was_serving and not self.backend_healthy:
            self.on_health(False)

    async def _poll_once(self, inst: InstanceState) -> None:
        """One health round of an instance: /health, then (once) /server_info, then
        /v1/loads."""
        backend, dispatcher = self.backends[inst.name], self.dispatchers[inst.role]
        timeout = max(self.config.backend.health_interval_s, 1.0)
        healthy = await backend.health(timeout_s=timeout)
        if healthy is None:  # slow: out only after several rounds in a row
            self.slow_rounds[inst.name] += 1
            if self.instance_up[inst.name] and self.slow_rounds[inst.name] < SLOW_HEALTH_ROUNDS:
                return
            healthy = False
        else:
            self.slow_rounds[inst.name] = 0
        if not healthy:
            self._instance_down(inst, "/health does not answer 200")
            return
        if inst.name in self.refused:
            self._instance_down(inst, self.refused[inst.name])
            return
        if not self.instance_up[inst.name]:
            was_serving = self.backend_healthy
            self.instance_up[inst.name] = True
            self.down_since[inst.name] = None
            dispatcher.mark_back(self.pool_ranks(inst))
            log.info("instance %s (%s, %s) is up", inst.name, inst.url, inst.role)
            await self._discover(inst, timeout)
            if not was_serving and self.backend_healthy:
                self.on_health(True)
        try:
            running, waiting = await backend.loads(inst.num_ranks, timeout_s=timeout)
            dispatcher.update_backend_loads(running, waiting, self.pool_ranks(inst).start)
        except BackendError as e:
            log.warning("instance %s: %s", inst.name, e)

    async def _discover(self, inst: InstanceState, timeout: float) -> None:
        """What the configuration left open, from the instance's /server_info: its SGLang
        version (which names the rank field), a prefill's bootstrap port, and the model
        name its OpenAI endpoints serve."""
        try:
            info = await self.backends[inst.name].server_info(timeout)
        except BackendError as e:
            log.warning("instance %s: %s; assuming SGLang's defaults", inst.name, e)
            return
        if self.sglang_versions[inst.name] is None and isinstance(info.get("version"), str):
            try:
                version = SglangVersion.parse(info["version"], f"{inst.name}'s /server_info")
            except MoeSchedulerError:
                log.warning("instance %s reports version %r", inst.name, info["version"])
            else:
                self.sglang_versions[inst.name] = version
                if inst.role == "decode" and version < DISAGG_PREFILL_DP_RANK_SINCE:
                    self.refused[inst.name] = decode_too_old(inst.name, version)
                    log.error("%s; it is kept out of service", self.refused[inst.name])
                    self._instance_down(inst, self.refused[inst.name])
        served = info.get("served_model_name")
        if isinstance(served, str) and served:
            self.served_models[inst.name] = served
        port = info.get("disaggregation_bootstrap_port")
        if not self.bootstrap_ports[inst.name] and isinstance(port, int):
            self.bootstrap_ports[inst.name] = port
        mode = info.get("disaggregation_mode")
        expected = "null" if inst.role == "mixed" else inst.role
        if isinstance(mode, str) and mode not in (expected, "") and mode != str(None):
            log.warning(
                "instance %s is configured as %s but runs --disaggregation-mode %s",
                inst.name,
                inst.role,
                mode,
            )

    async def _poll_instance(self, name: str) -> None:
        while True:
            await asyncio.sleep(self.config.backend.health_interval_s)
            inst = next((i for i in self.cluster.instances if i.name == name), None)
            if inst is None:
                return
            await self._poll_once(inst)
            self._fail_queued_of_dead_pools()
            self._update_rank_gauges()

    async def _watch_loop(self, interval_s: float = 0.02) -> None:
        """How late the loop runs: the overshoot of a short sleep, averaged over about
        :data:`LOOP_LAG_WINDOW_S` (:func:`smoothed_lag`)."""
        while True:
            started = time.monotonic()
            await asyncio.sleep(interval_s)
            elapsed = time.monotonic() - started
            self.loop_lag_s = smoothed_lag(self.loop_lag_s, elapsed - interval_s, elapsed)
            self.metrics.loop_lag.set(self.loop_lag_s)

    async def _flush_feedback(self) -> None:
        while True:
            await asyncio.sleep(self.config.feedback.flush_interval_s)
            directory = self.config.feedback.dir
            if directory is not None:
                try:
                    await asyncio.to_thread(write_feedback, directory, *self.feedback.snapshot())
                except OSError as e:
                    log.warning("feedback: cannot write %s: %s", directory, e)

    def _update_rank_gauges(self) -> None:
        m, per_node = self.metrics, self.cluster.topology.gpus_per_node
        for inst in self.cluster.instances:
            d = self.dispatchers[inst.role]
            healthy = d.healthy()
            for local, r in enumerate(self.pool_ranks(inst)):
                labels = (inst.name, str(local))
                m.rank_in_flight.labels(*labels, str(local // per_node)).set(int(d.in_flight[r]))
                m.rank_healthy.labels(*labels).set(int(healthy[r]))
                m.backend_running.labels(*labels).set(int(d.backend_running[r]))
                m.backend_waiting.labels(*labels).set(int(d.backend_waiting[r]))
        t = self.telemetry
        m.telemetry.labels("sampled").set(self.sampler.asked)
        m.telemetry.labels("accounted").set(t.accounted)
        m.telemetry.labels("dropped").set(t.dropped + t.failed)

    # ------------------------------------------------------------------ reload

    def _load(self) -> tuple[ServerConfig, ClusterState, dict[str, RoutingPolicy]]:
        """Read and check the configuration file and all it points at (off the loop)."""
        config = load_config(self.config.path)
        cluster = load_cluster(config)

        def shape(c: ClusterState) -> list[tuple[str, str, int, int]]:
            return [(i.name, i.role, i.num_ranks, i.topology.gpus_per_node) for i in c.instances]

        if shape(cluster) != shape(self.cluster):
            raise MoeSchedulerError(
                "the cluster shape changed (instances, roles or GPUs); restart the server "
                "to serve another cluster"
            )
        s, old = config.server, self.config.server
        restart_keys = (
            "listen",
            "metrics_listen",
            "tls_cert",
            "tls_key",
            "tls_client_ca",
            "max_streams_per_connection",
        )
        changed = [k for k in restart_keys if getattr(s, k) != getattr(old, k)]
        if changed:
            raise MoeSchedulerError(f"server.{', server.'.join(changed)}: a change needs a restart")
        return (
            config,
            cluster,
            {role: build_policy(config, cluster, role) for role in cluster.pools},
        )

    async def reload(self) -> tuple[bool, str]:
        """Re-read the configuration file; on any problem keep the old one. The reading
        runs in a thread; the new configuration is swapped in at once, on the loop."""
        async with self._reload_lock:
            try:
                config, cluster, policies = await asyncio.to_thread(self._load)
                changed = (config.backend, config.instances) != (
                    self.config.backend,
                    self.config.instances,
                )
                backends = self._backends(config, cluster) if changed else None
                admin_token = self._admin_token(config)
                openai_api_key = self._openai_api_key(config)
            except MoeSchedulerError as e:
                self.metrics.config_reloads.labels("rejected").inc()
                log.error("configuration reload rejected, the old one stays: %s", e)
                return False, f"rejected, the old configuration stays: {e}"
            old_backends, old_telemetry = None, None
            if backends is not None:
                old_backends, self.backends = self.backends, backends
                for inst in cluster.instances:  # what the new configuration leaves open
                    self.sglang_versions[inst.name] = (
                        inst.sglang_version or self.sglang_versions[inst.name]
                    )
                    self.bootstrap_ports[inst.name] = (
                        inst.bootstrap_port or self.bootstrap_ports[inst.name]
                    )
            if cluster.version != self.cluster.version or config.feedback != self.config.feedback:
                old_telemetry, self.telemetry = self.telemetry, self._telemetry(config, cluster)
            if cluster.version != self.cluster.version:
                self.feedback = Feedback(cluster, config.feedback.buffer_size)
            if config.backend != self.config.backend:
                self.sampler = self._sampler(config)
            self.predictor = RequestPredictor(cluster)
            self.admin_token = admin_token
            self.openai_api_key = openai_api_key
            self.config, self.cluster = config, cluster
            self.max_event_bytes = max_event_bytes(config, cluster)
            for role, policy in policies.items():
                self.dispatchers[role].replace_policy(
                    policy,
                    self.capacity_share(config),
                    config.policy.window_ms / 1000,
                    config.policy.max_window,
                    config.server.max_queue,
                    config.backend.failed_rank_cooldown_s,
                )
            self.metrics.config_reloads.labels("ok").inc()
            log.info(
                "configuration %s loaded (placement %s, policy %s)",
                config.version,
                cluster.version,
                config.policy.name,
            )
        for old in (old_backends or {}).values():
            await old.close()
        if old_telemetry is not None:
            await asyncio.to_thread(old_telemetry.close)
            await asyncio.to_thread(self.telemetry.warm)
        return True, f"configuration {config.version} loaded"

    # ------------------------------------------------------------------ requests

    def model_names(self) -> list[str]:
        """The model names the OpenAI front door answers to: each instance's served model
        name (from its /server_info), then the placement's model."""
        return list(dict.fromkeys([*self.served_models.values(), self.cluster.model.name]))

    def validate(self, request: dict[str, Any]) -> Job:
        return validate(self.config, self.cluster, request)

    async def run(
        self, job: Job, deadline: float | None, on_chunk: Chunk | EventChunk | None
    ) -> Outcome:
        """Serve ``job``; ``deadline``: the client's, absolute ``time.monotonic()``, or
        None; ``on_chunk``: called with each new (text, token ids) when streaming
        (:data:`EventChunk` for an OpenAI endpoint). Raises RequestError."""
        out = Outcome(job.request_id, attempts=0)
        prediction = await self._predict(job, deadline)
        out.predicted_class = prediction.cls or ""
        out.prediction_source = prediction.source
        info = RequestInfo(job.request_id, prediction.cls, prediction.histogram, job.prompt_tokens)
        model = self.cluster.model
        routed = self.sampler.want(
            (job.prompt_tokens + job.max_new_tokens) * model.num_hidden_layers * model.top_k
        )
        times = self.dispatcher.times
        need_s = times.need_s(on_chunk is not None, job.max_new_tokens)
        sent = _Sent()
        give_up = time.monotonic() + self.config.backend.request_timeout_s
        if deadline is not None:
            give_up = min(give_up, deadline)
        unreachable_since: float | None = None
        for role in self.cluster.pools:
            if (error := self._dead_pool(role)) is not None:
                raise error
        prefill: _Leg | None = None
        prefill_answer: Answer | None = None
        while True:
            out.attempts += 1
            waited = time.monotonic()
            prefill = None
            if self.cluster.disaggregated:
                prefill = await self._acquire_leg("prefill", info, deadline, 0.0, give_up)
            try:
                role = self.cluster.serving_pool.role
                leg = await self._acquire_leg(role, info, deadline, need_s, give_up)
            except BaseException:
                if prefill is not None:
                    prefill.release()
                raise
            dispatched = time.monotonic()
            out.queue_seconds += dispatched - waited
            self.metrics.queue.observe(dispatched - waited)
            delay = 0.0
            timeout = max(0.001, give_up - time.monotonic())
            try:
                if prefill is None:
                    payload = self._payload(job, leg, prediction.cls, routed)
                    answer = await self._send(leg, payload, timeout, on_chunk, sent, job.endpoint)
                else:
                    answer, prefill_answer = await self._send_pair(
                        job, prefill, leg, prediction.cls, routed, timeout, on_chunk, sent
                    )
                break
            except BackendError as e:
                failed = self._failed_instance(e, leg, prefill)
                unreachable = isinstance(e, BackendUnreachable)
                if unreachable and failed is not None:
                    self._instance_down(failed, str(e))
                if isinstance(e, RankFailed) and failed is not None:
                    rank = leg if failed is leg.instance else prefill
                    assert rank is not None
                    log.warning(
                        "instance %s rank %d failed (%s); taken out for %.0f s",
                        failed.name,
                        rank.dp_rank,
                        e,
                        self.config.backend.failed_rank_cooldown_s,
                    )
                    rank.dispatcher.mark_failed(rank.pool_rank)
                if isinstance(e, BackendRejected):
                    raise RequestError("invalid", str(e)) from e
                now = time.monotonic()
                if unreachable:
                    unreachable_since = unreachable_since or now
                    allowed = now - unreachable_since < self.config.backend.unreachable_retry_s
                else:
                    allowed = out.attempts <= self.config.backend.retries
                # Another instance of the same role takes it at once; else wait for one.
                others = leg.dispatcher.healthy().any() and (
                    prefill is None or prefill.dispatcher.healthy().any()
                )
                delay = 0.0 if unreachable and others else self._backoff(out.attempts)
                if sent.any and unreachable:
                    raise RequestError(
                        "backend_error",
                        f"instance {e.instance or leg.instance.name} failed after the stream "
                        f"sent tokens ({e}); the answer is incomplete and is not retried, so "
                        "that no token is sent twice",
                    ) from e
                if not e.retryable or sent.any or not allowed or now + delay >= give_up:
                    raise RequestError("backend_error", str(e)) from e
                self.dispatcher.reroutes += 1
                self.metrics.reroutes.inc()
                log.info("request %s: retrying in %.3f s after %s", job.request_id, delay, e)
            except TimeoutError as e:
                outcome = "client_deadline" if deadline is not None else "deadline"
                raise RequestError(
                    outcome, f"no answer from the backend within {timeout:.3g} s"
                ) from e
            finally:
                leg.release()
                if prefill is not None:
                    prefill.release()
            await asyncio.sleep(delay)
        now = time.monotonic()
        meta = answer.meta
        per_node = self.cluster.topology.gpus_per_node
        out.rank, out.dp_rank, out.instance = leg.fleet_rank, leg.dp_rank, leg.instance.name
        out.node = leg.dp_rank // per_node
        if prefill is not None:
            out.prefill_instance, out.prefill_dp_rank = prefill.instance.name, prefill.dp_rank
        out.text, out.output_ids, out.body = answer.text, answer.output_ids, answer.body
        out.prompt_tokens = _int(meta.get("prompt_tokens"), job.prompt_tokens)
        out.completion_tokens = _int(meta.get("completion_tokens"), 0)
        finish = meta.get("finish_reason")
        out.finish_reason = str(finish.get("type", "")) if isinstance(finish, dict) else ""
        out.ttft_seconds = (sent.first or now) - job.arrived
        out.total_seconds = now - job.arrived
        times.observe(
            now - dispatched,
            (sent.first or now) - dispatched,
            out.completion_tokens,
            job.max_new_tokens,
        )
        self._estimate(out, prediction)
        legs = [(answer.routed, out.rank, "all" if prefill is None else "decode")]
        if prefill is not None and prefill_answer is not None:
            legs.append((prefill_answer.routed, prefill.fleet_rank, "prefill"))
        await self._account(job, out, prediction, legs, deadline)
        self.metrics.ttft.observe(out.ttft_seconds)
        self.metrics.total.observe(out.total_seconds)
        return out

    @staticmethod
    def _failed_instance(e: BackendError, leg: _Leg, prefill: _Leg | None) -> InstanceState | None:
        for candidate in (leg, prefill):
            if candidate is not None and candidate.instance.name == e.instance:
                return candidate.instance
        return None

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2^(attempt-1))]."""
        b = self.config.backend
        return random.uniform(0, min(b.retry_backoff_max_s, b.retry_backoff_s * 2 ** (attempt - 1)))

    async def _acquire_leg(
        self,
        role: str,
        info: RequestInfo,
        deadline: float | None,
        need_s: float,
        give_up: float | None = None,
    ) -> _Leg:
        dispatcher = self.dispatchers[role]
        rank = await self._acquire(dispatcher, info, deadline, need_s, give_up)
        pool = self.cluster.pools[role]
        return _Leg(dispatcher, info, rank, pool.instance_of(rank), pool.first_rank + rank)

    async def _acquire(
        self,
        dispatcher: Dispatcher,
        info: RequestInfo,
        deadline: float | None,
        need_s: float,
        give_up: float | None = None,
    ) -> int:
        """A rank slot, waiting at most until the client's ``deadline`` (else until
        ``give_up``, the server's own bound: backend.request_timeout_s)."""
        rank = dispatcher.try_acquire(info)  # the fast path: no waiting, no task
        if rank is not None:
            return rank
        until = deadline if deadline is not None else give_up
        try:
            if until is None:
                return await dispatcher.acquire(info)
            return await asyncio.wait_for(
                dispatcher.acquire(info, deadline, need_s),
                timeout=max(0.0, until - time.monotonic()),
            )
        except TimeoutError as e:
            if deadline is None:
                raise RequestError(
                    "deadline", "backend.request_timeout_s passed while queued for a rank"
                ) from e
            raise RequestError(
                "client_deadline", "the deadline passed while queued for a rank"
            ) from e

    def _payload(
        self, job: Job, leg: _Leg, cls: str | None, routed: bool = False
    ) -> dict[str, Any]:
        """The body for ``leg``: the rank pin under the name the instance's SGLang version
        knows (``routed_dp_rank``, or ``data_parallel_rank`` up to 0.5.9). An OpenAI body
        is the client's, with the instance's served model name, the rid, the pin, and
        routed experts asked for where the version's OpenAI endpoints return them."""
        version = self.sglang_versions[leg.instance.name]
        payload: dict[str, Any] = {"rid": job.request_id, rank_field(version): leg.dp_rank}
        if cls:  # (for an OpenAI endpoint the backend sends it as a header)
            payload["routing_key"] = cls
        if job.openai is not None:
            if version is not None and version < OPENAI_DP_RANK_SINCE:
                self._warn_once(
                    leg.instance.name,
                    f"instance {leg.instance.name} runs SGLang {version}, whose OpenAI endpoints "
                    "drop the DP-rank field: its OpenAI requests are load-balanced by SGLang, "
                    "not placed by the policy (Generate keeps the pin; 0.5.7 has the field)",
                )
            payload = {**job.openai, **payload}
            if served := self.served_models.get(leg.instance.name):
                payload["model"] = served
            routed = routed and (version is None or version >= OPENAI_ROUTED_EXPERTS_SINCE)
        else:
            payload["sampling_params"] = _sglang_sampling(job.sampling)
            if job.text is not None:
                payload["text"] = job.text
            else:
                payload["input_ids"] = job.input_ids
        if routed:
            payload["return_routed_experts"] = True
        return payload

    async def _send(
        self,
        leg: _Leg,
        payload: dict[str, Any],
        timeout: float,
        on_chunk: Chunk | EventChunk | None,
        sent: _Sent,
        endpoint: str = GENERATE,
    ) -> Answer:
        """One request to ``endpoint`` on ``leg``'s instance; its BackendError names the
        instance. A streamed OpenAI endpoint asks for the usage chunk (``on_chunk`` gets
        it only if ``payload`` did)."""
        backend = self.backends[leg.instance.name]
        try:
            if on_chunk is None:
                answer = await backend.generate(payload, timeout, endpoint)
                sent.first = time.monotonic()
                return answer
            return await self._stream(backend, payload, timeout, on_chunk, sent, endpoint)
        except BackendError as e:
            e.instance = leg.instance.name
            raise

    async def _send_pair(
        self,
        job: Job,
        prefill: _Leg,
        decode: _Leg,
        cls: str | None,
        routed: bool,
        timeout: float,
        on_chunk: Chunk | EventChunk | None,
        sent: _Sent,
    ) -> tuple[Answer, Answer | None]:
        """Both legs of a disaggregated request at once, as sgl-router's PD mode sends
        them: the same body with the prefill instance's bootstrap host and port and a
        random room (congruent to the prefill rank); the prefill leg pinned to its rank,
        the decode leg to its own with ``disagg_prefill_dp_rank`` naming the prefill's.
        The client gets the decode leg; the prefill leg's answer (its prompt's routed
        experts) comes back too, or None. The prefill slot is given back when the
        prefill leg ends."""
        # The room names the prefill rank too (room % ranks), so that SGLang's
        # follow_bootstrap_room on the prefill instance agrees with the pinned rank.
        ranks = prefill.instance.num_ranks
        room = random.getrandbits(62) // ranks * ranks + prefill.dp_rank
        bootstrap = {
            "bootstrap_host": prefill.instance.bootstrap_host,
            "bootstrap_port": self.bootstrap_ports[prefill.instance.name] or DEFAULT_BOOTSTRAP_PORT,
            "bootstrap_room": room,
        }
        first = {**self._payload(job, prefill, cls, routed), **bootstrap}
        second = {
            **self._payload(job, decode, cls, routed),
            **bootstrap,
            "disagg_prefill_dp_rank": prefill.dp_rank,
        }
        endpoint = job.endpoint
        prefill_task = asyncio.ensure_future(
            self._send(prefill, first, timeout, None, _Sent(), endpoint)
        )
        prefill_task.add_done_callback(lambda _: prefill.release())
        decode_task = asyncio.ensure_future(
            self._send(decode, second, timeout, on_chunk, sent, endpoint)
        )
        try:
            # The decode leg decides: a prefill that failed after its KV reached the
            # decode rank leaves a decode that still finishes, and one that failed before
            # leaves a decode whose transfer fails (SGLang detects it) and is retried.
            # Cancelling the decode leg at the prefill's failure could run it twice.
            try:
                answer = await decode_task
            except BackendError as e:
                failed = prefill_task.done() and not prefill_task.cancelled()
                if failed and isinstance(prefill_task.exception(), BackendError):
                    raise prefill_task.exception() from e  # type: ignore[misc]
                raise
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(prefill_task), REPLY_TELEMETRY_WAIT_S)
            ok = prefill_task.done() and not prefill_task.cancelled()
            return answer, prefill_task.result() if ok and not prefill_task.exception() else None
        finally:
            for task in (prefill_task, decode_task):
                if not task.done():
                    task.cancel()
            await asyncio.gather(prefill_task, decode_task, return_exceptions=True)

    async def _stream(
        self,
        backend: SGLangBackend,
        payload: dict[str, Any],
        timeout: float,
        on_chunk: Chunk | EventChunk,
        sent: _Sent,
        endpoint: str,
    ) -> Answer:
        answer = Answer()
        events = None
        if endpoint != GENERATE:  # the usage chunk says how many tokens were generated
            options = payload.get("stream_options")
            keep = isinstance(options, dict) and options.get("include_usage") is True
            events = OpenAIEvents(keep)
            options = options if isinstance(options, dict) else {}
            payload = {**payload, "stream_options": {**options, "include_usage": True}}
        relay = cast(Callable[[str, Any], Awaitable[None]], on_chunk)
        stream = backend.generate_stream(payload, timeout, self.max_event_bytes, events, endpoint)
        async for item in stream:
            if isinstance(item, Answer):
                answer = item
                break
            text, rest = item
            if text or rest:
                if sent.first is None:
                    sent.first = time.monotonic()
                sent.any = True
                await relay(text, rest)
        return answer

    async def _predict(self, job: Job, deadline: float | None) -> Prediction:
        p, mode = self.predictor, self.config.prediction.mode
        tokens = job.prompt_tokens + job.max_new_tokens
        if job.class_hint:
            return p.from_hint(job.class_hint, tokens)
        if mode == "conversation":
            found = p.from_conversation(job.conversation_id, tokens)
            if found is not None:
                return found
        if mode == "probe" and job.max_new_tokens >= self.config.prediction.probe_min_new_tokens:
            probed = await self._probe(job, deadline, tokens)
            if probed is not None:
                return probed
        if mode != "none" and job.text is not None:
            return self._from_text(job.text, tokens)
        return Prediction(None, "none")

    def _from_text(self, text: str, tokens: int) -> Prediction:
        return self.predictor.from_text(text[: self.config.prediction.max_text_chars], tokens)

    async def _probe(self, job: Job, deadline: float | None, tokens: int) -> Prediction | None:
        """A one-token prefill with routed experts returned: the prompt's real routing.
        It runs where the text prediction would send the request, so SGLang's prefix
        cache can reuse its KV if the request follows it there."""
        guess = self._from_text(job.text, tokens) if job.text else Prediction(None, "none")
        if self.cluster.disaggregated:
            return None  # a prefill instance runs nothing without its decode peer
        info = RequestInfo(f"{job.request_id}-probe", guess.cls, guess.histogram, job.prompt_tokens)
        leg = await self._acquire_leg(self.cluster.serving_pool.role, info, deadline, 0.0)
        try:
            payload = self._payload(job, leg, guess.cls, routed=True)
            payload["rid"] = info.request_id
            if job.openai is None:
                payload["sampling_params"] = {**payload["sampling_params"], "max_new_tokens": 1}
            else:
                payload.pop("max_completion_tokens", None)
                payload.pop("stream_options", None)
                payload["max_tokens"] = 1
            timeout = self.config.backend.request_timeout_s
            if deadline is not None:
                timeout = max(0.001, min(timeout, deadline - time.monotonic()))
            answer = await self._send(leg, payload, timeout, None, _Sent(), job.endpoint)
        except (BackendError, TimeoutError) as e:
            log.info("request %s: probe failed (%s); using the text prediction", job.request_id, e)
            return None
        finally:
            leg.release()
        self.probes += 1
        if answer.routed is None:
            return None
        future = self.telemetry.submit(
            answer.routed, leg.fleet_rank, _int(answer.meta.get("prompt_tokens"), 0)
        )
        if future is None:
            return None
        try:
            obs: Observation = await future
        except Exception as e:  # the worker's own error: fall back, never fail the request
            log.warning("request %s: probe routed experts unusable: %s", job.request_id, e)
            return None
        return self.predictor.from_routing(obs.prefill + obs.decode, tokens, "probe")

    def _estimate(self, out: Outcome, prediction: Prediction) -> None:
        if prediction.histogram is not None:
            node = out.rank // self.cluster.topology.gpus_per_node  # the fleet's node
            far = 1.0 - self.cluster.node_present[:, node]
            remote = float(np.asarray(prediction.histogram).ravel() @ far)
            estimate = remote * self.cluster.bytes_per_copy
            self.estimated_inter_node_bytes += estimate
            self.metrics.estimated_inter_node_bytes.inc(estimate)

    async def _account(
        self,
        job: Job,
        out: Outcome,
        prediction: Prediction,
        legs: list[tuple[bytes | None, int, str]],
        deadline: float | None,
    ) -> None:
        """Hand the routed experts of each leg ``(routed, fleet rank, phase)`` to the
        telemetry worker (a disaggregated request's prefill leg counts its prompt rows
        on the prefill rank, its decode leg the generated rows on the decode rank); each
        observation is recorded whenever it comes back, and copied into ``out`` if that
        is soon. The first leg counts the request, the prompt and the prediction."""
        feedback, cluster = self.feedback, self.cluster
        futures = []
        for index, (routed, rank, phase) in enumerate(legs):
            if routed is None:
                continue
            future = self.telemetry.submit(routed, rank, out.prompt_tokens, phase)
            if future is None:
                continue
            future.add_done_callback(
                functools.partial(
                    self._record, job, prediction, rank, index == 0, len(routed), feedback, cluster
                )
            )
            futures.append(future)
        if not futures:
            return
        wait = REPLY_TELEMETRY_WAIT_S
        if deadline is not None:
            wait = min(wait, deadline - time.monotonic() - 0.005)
        if wait > 0:
            await asyncio.wait(futures, timeout=wait)
        observed = [
            f.result() for f in futures if f.done() and not f.cancelled() and not f.exception()
        ]
        if len(observed) == len(futures):
            pairs = sum(o.token_layers for o in observed)
            local = sum(o.local_fraction * o.token_layers for o in observed)
            out.local_fraction = local / pairs if pairs else 1.0
            out.inter_node_bytes = float(sum(o.inter_node_bytes for o in observed))

    def _record(
        self,
        job: Job,
        prediction: Prediction,
        rank: int,
        first: bool,
        encoded_bytes: int,
        feedback: Feedback,
        cluster: ClusterState,
        f: asyncio.Future[Any],
    ) -> None:
        if f.cancelled():
            return
        error = f.exception()
        if error is not None:
            log.warning("request %s: routed experts unusable: %s", job.request_id, error)
            return
        obs: Observation = f.result()
        self.sampler.observe(obs.cpu_seconds, encoded_bytes * 3 // 16)  # base64 -> int32 ids
        if feedback is not self.feedback or cluster is not self.cluster:
            return  # measured under a placement that has been replaced
        feedback.record(
            obs,
            prediction.cls,
            rank,
            job.text or "" if first else "",
            predicted=first and prediction.source != "none",
            count_request=first,
        )
        if first:
            self.predictor.remember(job.conversation_id, obs.prefill + obs.decode)
        m = self.metrics
        m.inter_node_bytes.inc(obs.inter_node_bytes)
        m.remote_hits.inc(obs.remote_hits)
        m.token_layers.inc(obs.token_layers)
        m.prediction_hit_ratio.set(feedback.prediction_hit_rate)


@dataclass
class _Leg:
    """One rank slot a request holds: the pool's dispatcher and rank, the instance and
    its SGLang DP rank. :meth:`release` gives the slot back once."""

    dispatcher: Dispatcher
    info: RequestInfo
    pool_rank: int
    instance: InstanceState
    fleet_rank: int
    released: bool = False

    @property
    def dp_rank(self) -> int:
        return self.fleet_rank - self.instance.first_rank

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.dispatcher.release(self.pool_rank, self.info)


@dataclass
class _Sent:
    first: float | None = None
    any: bool = False


def _int(value: object, default: int) -> int:
    return value if isinstance(value, int) and value >= 0 else default


def _sglang_sampling(sampling: dict[str, Any]) -> dict[str, Any]:
    out = dict(sampling)
    if "seed" in out:
        out["sampling_seed"] = out.pop("seed")
    return out
