"""The scheduler's request path, independent of gRPC: validate, predict, take a rank slot,
dispatch to SGLang (retrying with backoff before the first token), relay the answer.

The serving loop only relays and decides. The routed experts that come back (asked for
on a sampled share of requests, ``telemetry.RoutedSampler``) are decoded and accounted by
the telemetry worker; a full worker drops telemetry, never the request. The gRPC
service (``service.py``) maps :class:`RequestError` outcomes to status codes and counts
every call once."""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scheduler.errors import MoeSchedulerError
from scheduler.policies import POLICIES, RequestInfo, RoutingPolicy, make_policy
from scheduler.server.backend import Answer, BackendError, SGLangBackend
from scheduler.server.cluster import ClusterState, load_cluster
from scheduler.server.config import (
    ADMIN_TOKEN_ENV,
    BACKEND_API_KEY_ENV,
    ServerConfig,
    load_config,
    read_secret,
)
from scheduler.server.dispatcher import DeadlineRefused, Dispatcher, Overloaded
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

log = logging.getLogger("moe_scheduler.server")

#: Tokens assumed for a request that does not say max_new_tokens (SGLang's default).
DEFAULT_NEW_TOKENS = 128


#: Longest user-supplied value quoted back in an error message.
_QUOTE_CHARS = 40
#: Seconds a reply waits for its own telemetry (local_fraction, inter_node_bytes).
REPLY_TELEMETRY_WAIT_S = 0.25


class RequestError(Exception):
    """A request that cannot be served. ``outcome``: one of ``metrics.OUTCOMES`` other
    than ok, cancelled and client_deadline (which the service sees itself)."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


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

    @property
    def max_new_tokens(self) -> int:
        return int(self.sampling.get("max_new_tokens", DEFAULT_NEW_TOKENS))


@dataclass
class Outcome:
    request_id: str
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    rank: int = -1
    node: int = -1
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


Chunk = Callable[[str, list[int]], Awaitable[None]]


def build_policy(config: ServerConfig, cluster: ClusterState) -> RoutingPolicy:
    """The configured policy, given whichever of the cluster's facts its constructor takes."""
    name = config.policy.name
    available: dict[str, Any] = {
        "placement": cluster.placement,
        "class_to_node_share": cluster.class_to_node_share,
        "band": config.policy.band,
        "balance": config.policy.balance,
    }
    cls = POLICIES[name][0] if name in POLICIES else None
    params = {}
    if cls is not None:
        accepted = inspect.signature(cls.__init__).parameters
        params = {k: v for k, v in available.items() if k in accepted}
    return make_policy(name, **params)


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
        prompt_tokens = max(1, math.ceil(len(text.encode("utf-8", "replace")) / 4))
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
        policy = build_policy(config, self.cluster)
        self.metrics = ServerMetrics()
        self.backend = self._backend(config)
        self.dispatcher = Dispatcher(
            policy,
            self.cluster.num_ranks,
            self.cluster.topology.gpus_per_node,
            self.capacity_share(config),
            window_s=config.policy.window_ms / 1000,
            max_window=config.policy.max_window,
            max_queue=config.server.max_queue,
            cooldown_s=config.backend.failed_rank_cooldown_s,
        )
        self.predictor = RequestPredictor(self.cluster)
        self.feedback = Feedback(self.cluster, config.feedback.buffer_size)
        self.telemetry = self._telemetry(config, self.cluster)
        self.sampler = self._sampler(config)
        self.max_event_bytes = max_event_bytes(config, self.cluster)
        self.admin_token = self._admin_token(config)
        self.backend_healthy = False
        self.started = time.monotonic()
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
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

    @staticmethod
    def _backend(config: ServerConfig) -> SGLangBackend:
        key = read_secret(config.backend.api_key_file, BACKEND_API_KEY_ENV, "backend.api_key_file")
        return SGLangBackend(config.backend.url, config.backend.connect_timeout_s, key)

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
        return s.max_queue + self.cluster.num_ranks * self.capacity_share(self.config)

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
        self.dispatcher.start()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._poll_backend(), name="poll-backend"))
        self._tasks.append(loop.create_task(self._watch_loop(), name="watch-loop"))
        if self.config.feedback.dir is not None:
            self._tasks.append(loop.create_task(self._flush_feedback(), name="flush-feedback"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.dispatcher.stop()
        await asyncio.to_thread(self.telemetry.close)
        if self.config.feedback.dir is not None:
            await asyncio.to_thread(
                write_feedback, self.config.feedback.dir, *self.feedback.snapshot()
            )
        await self.backend.close()

    async def _poll_backend(self) -> None:
        while True:
            interval = self.config.backend.health_interval_s
            healthy = await self.backend.health(timeout_s=max(interval, 1.0))
            if healthy != self.backend_healthy:
                log.info("backend %s is %s", self.backend.url, "up" if healthy else "DOWN")
                self.backend_healthy = healthy
                self.on_health(healthy)
            if healthy:
                try:
                    running, waiting = await self.backend.loads(
                        self.cluster.num_ranks, timeout_s=max(interval, 1.0)
                    )
                    self.dispatcher.update_backend_loads(running, waiting)
                except BackendError as e:
                    log.warning("%s", e)
            self._update_rank_gauges()
            await asyncio.sleep(interval)

    async def _watch_loop(self, interval_s: float = 0.02) -> None:
        """How late the loop runs: the overshoot of a short sleep, decaying by half per
        interval (so one slow callback is seen, and forgotten within a few intervals)."""
        while True:
            started = time.monotonic()
            await asyncio.sleep(interval_s)
            late = time.monotonic() - started - interval_s
            self.loop_lag_s = max(late, self.loop_lag_s / 2)
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
        d, m, per_node = self.dispatcher, self.metrics, self.cluster.topology.gpus_per_node
        healthy = d.healthy()
        for r in range(d.num_ranks):
            m.rank_in_flight.labels(str(r), str(r // per_node)).set(int(d.in_flight[r]))
            m.rank_healthy.labels(str(r)).set(int(healthy[r]))
            m.backend_running.labels(str(r)).set(int(d.backend_running[r]))
            m.backend_waiting.labels(str(r)).set(int(d.backend_waiting[r]))
        t = self.telemetry
        m.telemetry.labels("sampled").set(self.sampler.asked)
        m.telemetry.labels("accounted").set(t.accounted)
        m.telemetry.labels("dropped").set(t.dropped + t.failed)

    # ------------------------------------------------------------------ reload

    def _load(self) -> tuple[ServerConfig, ClusterState, RoutingPolicy]:
        """Read and check the configuration file and all it points at (off the loop)."""
        config = load_config(self.config.path)
        cluster = load_cluster(config)
        if (cluster.num_ranks, cluster.topology.gpus_per_node) != (
            self.cluster.num_ranks,
            self.cluster.topology.gpus_per_node,
        ):
            raise MoeSchedulerError(
                "the cluster shape changed; restart the server to serve another cluster"
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
        return config, cluster, build_policy(config, cluster)

    async def reload(self) -> tuple[bool, str]:
        """Re-read the configuration file; on any problem keep the old one. The reading
        runs in a thread; the new configuration is swapped in at once, on the loop."""
        async with self._reload_lock:
            try:
                config, cluster, policy = await asyncio.to_thread(self._load)
                backend = self._backend(config) if config.backend != self.config.backend else None
                admin_token = self._admin_token(config)
            except MoeSchedulerError as e:
                self.metrics.config_reloads.labels("rejected").inc()
                log.error("configuration reload rejected, the old one stays: %s", e)
                return False, f"rejected, the old configuration stays: {e}"
            old_backend, old_telemetry = None, None
            if backend is not None:
                old_backend, self.backend = self.backend, backend
            if cluster.version != self.cluster.version or config.feedback != self.config.feedback:
                old_telemetry, self.telemetry = self.telemetry, self._telemetry(config, cluster)
            if cluster.version != self.cluster.version:
                self.feedback = Feedback(cluster, config.feedback.buffer_size)
            if config.backend != self.config.backend:
                self.sampler = self._sampler(config)
            self.predictor = RequestPredictor(cluster)
            self.admin_token = admin_token
            self.config, self.cluster = config, cluster
            self.max_event_bytes = max_event_bytes(config, cluster)
            self.dispatcher.replace_policy(
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
        if old_backend is not None:
            await old_backend.close()
        if old_telemetry is not None:
            await asyncio.to_thread(old_telemetry.close)
            await asyncio.to_thread(self.telemetry.warm)
        return True, f"configuration {config.version} loaded"

    # ------------------------------------------------------------------ requests

    def validate(self, request: dict[str, Any]) -> Job:
        return validate(self.config, self.cluster, request)

    async def run(self, job: Job, deadline: float | None, on_chunk: Chunk | None) -> Outcome:
        """Serve ``job``; ``deadline``: the client's, absolute ``time.monotonic()``, or
        None; ``on_chunk``: called with each new (text, token ids) when streaming.
        Raises RequestError."""
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
        while True:
            out.attempts += 1
            waited = time.monotonic()
            rank = await self._acquire(info, deadline, need_s)
            dispatched = time.monotonic()
            out.queue_seconds += dispatched - waited
            self.metrics.queue.observe(dispatched - waited)
            delay = 0.0
            try:
                payload = self._payload(job, rank, prediction.cls, routed)
                timeout = max(0.001, give_up - time.monotonic())
                if on_chunk is None:
                    answer = await self.backend.generate(payload, timeout)
                    sent.first = time.monotonic()
                else:
                    answer = await self._stream(payload, timeout, on_chunk, sent)
                break
            except BackendError as e:
                if e.rank_failed:
                    log.warning(
                        "rank %d failed (%s); taken out for %.0f s",
                        rank,
                        e,
                        self.config.backend.failed_rank_cooldown_s,
                    )
                    self.dispatcher.mark_failed(rank)
                if e.invalid:
                    raise RequestError("invalid", str(e)) from e
                now = time.monotonic()
                if e.unreachable:
                    unreachable_since = unreachable_since or now
                    allowed = now - unreachable_since < self.config.backend.unreachable_retry_s
                else:
                    allowed = out.attempts <= self.config.backend.retries
                delay = self._backoff(out.attempts)
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
                self.dispatcher.release(rank, info)
            await asyncio.sleep(delay)
        now = time.monotonic()
        meta = answer.meta
        out.rank, out.node = rank, rank // self.cluster.topology.gpus_per_node
        out.text, out.output_ids = answer.text, answer.output_ids
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
        await self._account(job, out, prediction, answer.routed, deadline)
        self.metrics.ttft.observe(out.ttft_seconds)
        self.metrics.total.observe(out.total_seconds)
        return out

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2^(attempt-1))]."""
        b = self.config.backend
        return random.uniform(0, min(b.retry_backoff_max_s, b.retry_backoff_s * 2 ** (attempt - 1)))

    async def _acquire(self, info: RequestInfo, deadline: float | None, need_s: float) -> int:
        rank = self.dispatcher.try_acquire(info)  # the fast path: no waiting, no task
        if rank is not None:
            return rank
        try:
            if deadline is None:
                return await self.dispatcher.acquire(info)
            return await asyncio.wait_for(
                self.dispatcher.acquire(info, deadline, need_s),
                timeout=max(0.0, deadline - time.monotonic()),
            )
        except Overloaded as e:
            raise RequestError("overloaded", f"the scheduler is overloaded: {e}") from e
        except DeadlineRefused as e:
            raise RequestError("refused_deadline", f"refused early: {e}") from e
        except TimeoutError as e:
            raise RequestError(
                "client_deadline", "the deadline passed while queued for a rank"
            ) from e

    def _payload(
        self, job: Job, rank: int, cls: str | None, routed: bool = False
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "rid": job.request_id,
            "routed_dp_rank": rank,
            "sampling_params": _sglang_sampling(job.sampling),
        }
        if job.text is not None:
            payload["text"] = job.text
        else:
            payload["input_ids"] = job.input_ids
        if cls:
            payload["routing_key"] = cls
        if routed:
            payload["return_routed_experts"] = True
        return payload

    async def _stream(
        self, payload: dict[str, Any], timeout: float, on_chunk: Chunk, sent: _Sent
    ) -> Answer:
        answer = Answer()
        async for item in self.backend.generate_stream(payload, timeout, self.max_event_bytes):
            if isinstance(item, Answer):
                answer = item
                break
            text, ids = item
            if text or ids:
                if sent.first is None:
                    sent.first = time.monotonic()
                sent.any = True
                await on_chunk(text, ids)
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
        info = RequestInfo(f"{job.request_id}-probe", guess.cls, guess.histogram, job.prompt_tokens)
        rank = await self._acquire(info, deadline, 0.0)
        try:
            payload = self._payload(job, rank, guess.cls, routed=True)
            payload["rid"] = info.request_id
            payload["sampling_params"] = {**payload["sampling_params"], "max_new_tokens": 1}
            timeout = self.config.backend.request_timeout_s
            if deadline is not None:
                timeout = max(0.001, min(timeout, deadline - time.monotonic()))
            answer = await self.backend.generate(payload, timeout)
        except (BackendError, TimeoutError) as e:
            log.info("request %s: probe failed (%s); using the text prediction", job.request_id, e)
            return None
        finally:
            self.dispatcher.release(rank, info)
        self.probes += 1
        if answer.routed is None:
            return None
        future = self.telemetry.submit(
            answer.routed, rank, _int(answer.meta.get("prompt_tokens"), 0)
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
            far = 1.0 - self.cluster.node_present[:, out.node]
            remote = float(np.asarray(prediction.histogram).ravel() @ far)
            estimate = remote * self.cluster.bytes_per_copy
            self.estimated_inter_node_bytes += estimate
            self.metrics.estimated_inter_node_bytes.inc(estimate)

    async def _account(
        self,
        job: Job,
        out: Outcome,
        prediction: Prediction,
        routed: bytes | None,
        deadline: float | None,
    ) -> None:
        """Hand the routed experts to the telemetry worker; the observation is recorded
        whenever it comes back, and copied into ``out`` if that is soon."""
        if routed is None:
            return
        future = self.telemetry.submit(routed, out.rank, out.prompt_tokens)
        if future is None:
            return
        feedback, cluster = self.feedback, self.cluster
        entries = len(routed) * 3 // 16  # base64 bytes -> int32 ids

        def record(f: asyncio.Future[Any]) -> None:
            if f.cancelled():
                return
            error = f.exception()
            if error is not None:
                log.warning("request %s: routed experts unusable: %s", job.request_id, error)
                return
            obs: Observation = f.result()
            self.sampler.observe(obs.cpu_seconds, entries)
            if feedback is not self.feedback or cluster is not self.cluster:
                return  # measured under a placement that has been replaced
            feedback.record(
                obs, prediction.cls, out.rank, job.text or "", predicted=prediction.source != "none"
            )
            self.predictor.remember(job.conversation_id, obs.prefill + obs.decode)
            m = self.metrics
            m.inter_node_bytes.inc(obs.inter_node_bytes)
            m.remote_hits.inc(obs.remote_hits)
            m.token_layers.inc(obs.token_layers)
            m.prediction_hit_ratio.set(feedback.prediction_hit_rate)

        future.add_done_callback(record)
        wait = REPLY_TELEMETRY_WAIT_S
        if deadline is not None:
            wait = min(wait, deadline - time.monotonic() - 0.005)
        if wait > 0:
            await asyncio.wait({future}, timeout=wait)
        if future.done() and not future.cancelled() and future.exception() is None:
            obs = future.result()
            out.local_fraction = obs.local_fraction
            out.inter_node_bytes = float(obs.inter_node_bytes)


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
