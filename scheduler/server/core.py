"""The scheduler's request path, independent of gRPC: validate, predict, take a rank slot,
dispatch to SGLang (retrying on another rank before the first token), account the
routed experts that come back. The gRPC service (``service.py``) maps its errors to
status codes."""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scheduler.errors import MoeSchedulerError
from scheduler.policies import POLICIES, RequestInfo, RoutingPolicy, make_policy
from scheduler.server.backend import BackendError, SGLangBackend
from scheduler.server.cluster import ClusterState, load_cluster
from scheduler.server.config import ServerConfig, load_config
from scheduler.server.dispatcher import Dispatcher, Overloaded
from scheduler.server.feedback import Feedback
from scheduler.server.metrics import ServerMetrics
from scheduler.server.predict import Prediction, RequestPredictor

log = logging.getLogger("moe_scheduler.server")

#: Tokens assumed for a request that does not say max_new_tokens (SGLang's default).
DEFAULT_NEW_TOKENS = 128


class RequestError(Exception):
    """A request that cannot be served. ``code``: invalid, overloaded, unavailable,
    deadline."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


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
    fields), ``class_hint``, ``conversation_id``.
    """
    s = config.server

    def bad(message: str) -> RequestError:
        return RequestError("invalid", message)

    text, ids = request.get("text"), request.get("input_ids")
    if text is None and ids is None:
        raise bad("the request has no prompt: set text or input_ids")
    if text is not None:
        if not text.strip():
            raise bad("the prompt text is empty")
        if len(text) > s.max_prompt_chars:
            raise bad(f"the prompt has {len(text)} characters; the limit is {s.max_prompt_chars}")
        prompt_tokens = max(1, math.ceil(len(text.encode("utf-8")) / 4))
    else:
        assert ids is not None
        if not ids:
            raise bad("input_ids is empty")
        if len(ids) > s.max_prompt_tokens:
            raise bad(f"the prompt has {len(ids)} tokens; the limit is {s.max_prompt_tokens}")
        if min(ids) < 0:
            raise bad("input_ids holds a negative token id")
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
    if any(not stop for stop in sampling.get("stop", [])):
        raise bad("stop strings must not be empty")
    hint = request.get("class_hint", "")
    classes = set(cluster.class_to_node_share) | set(cluster.class_shares)
    if hint and hint not in classes:
        raise bad(
            f"unknown class_hint {hint!r}; the plan's classes are {', '.join(sorted(classes))}"
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


class SchedulerCore:
    """One running configuration and everything that serves it."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.cluster = load_cluster(config)
        policy = build_policy(config, self.cluster)
        self.metrics = ServerMetrics()
        self.backend = SGLangBackend(config.backend.url, config.backend.connect_timeout_s)
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
        self.backend_healthy = False
        self.started = time.monotonic()
        self.requests_ok = 0
        self.requests_failed = 0
        self.probes = 0
        self.estimated_inter_node_bytes = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self.on_health: Callable[[bool], None] = lambda serving: None

    @staticmethod
    def capacity_share(config: ServerConfig) -> int:
        return config.policy.capacity // config.server.replicas

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.dispatcher.start()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._poll_backend(), name="poll-backend"))
        if self.config.feedback.dir is not None:
            self._tasks.append(loop.create_task(self._flush_feedback(), name="flush-feedback"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.dispatcher.stop()
        if self.config.feedback.dir is not None:
            self.feedback.flush(self.config.feedback.dir)
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

    async def _flush_feedback(self) -> None:
        while True:
            await asyncio.sleep(self.config.feedback.flush_interval_s)
            directory = self.config.feedback.dir
            if directory is not None:
                try:
                    self.feedback.flush(directory)
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

    # ------------------------------------------------------------------ reload

    def reload(self) -> tuple[bool, str]:
        """Re-read the configuration file; on any problem keep the old one."""
        try:
            config = load_config(self.config.path)
            cluster = load_cluster(config)
            if (cluster.num_ranks, cluster.topology.gpus_per_node) != (
                self.cluster.num_ranks,
                self.cluster.topology.gpus_per_node,
            ):
                raise MoeSchedulerError(
                    "the cluster shape changed; restart the server to serve another cluster"
                )
            if config.server.listen != self.config.server.listen or (
                config.server.metrics_listen != self.config.server.metrics_listen
            ):
                raise MoeSchedulerError("server.listen / metrics_listen change needs a restart")
            policy = build_policy(config, cluster)
        except MoeSchedulerError as e:
            self.metrics.config_reloads.labels("rejected").inc()
            log.error("configuration reload rejected, the old one stays: %s", e)
            return False, f"rejected, the old configuration stays: {e}"
        old_backend = None
        if config.backend.url != self.config.backend.url:
            old_backend = self.backend
            self.backend = SGLangBackend(config.backend.url, config.backend.connect_timeout_s)
        if cluster.version != self.cluster.version:
            self.feedback = Feedback(cluster, config.feedback.buffer_size)
        self.predictor = RequestPredictor(cluster)
        self.config, self.cluster = config, cluster
        self.dispatcher.replace_policy(
            policy,
            self.capacity_share(config),
            config.policy.window_ms / 1000,
            config.policy.max_window,
            config.server.max_queue,
            config.backend.failed_rank_cooldown_s,
        )
        if old_backend is not None:
            asyncio.get_running_loop().create_task(old_backend.close())
        self.metrics.config_reloads.labels("ok").inc()
        log.info(
            "configuration %s loaded (placement %s, policy %s)",
            config.version,
            cluster.version,
            config.policy.name,
        )
        return True, f"configuration {config.version} loaded"

    # ------------------------------------------------------------------ requests

    def validate(self, request: dict[str, Any]) -> Job:
        return validate(self.config, self.cluster, request)

    async def run(self, job: Job, deadline: float | None, on_chunk: Chunk | None) -> Outcome:
        """Serve ``job``; ``deadline``: absolute ``time.monotonic()`` or None; ``on_chunk``:
        called with each new (text, token ids) when streaming. Raises RequestError."""
        out = Outcome(job.request_id, attempts=0)
        prediction = await self._predict(job, deadline)
        out.predicted_class = prediction.cls or ""
        out.prediction_source = prediction.source
        info = RequestInfo(job.request_id, prediction.cls, prediction.histogram, job.prompt_tokens)
        sent = _Sent()
        response: dict[str, Any] = {}
        while True:
            out.attempts += 1
            waited = time.monotonic()
            rank = await self._acquire(info, deadline)
            out.queue_seconds += time.monotonic() - waited
            self.metrics.queue.observe(time.monotonic() - waited)
            try:
                payload = self._payload(job, rank, prediction.cls)
                timeout = self._remaining(deadline)
                if on_chunk is None:
                    response = await self.backend.generate(payload, timeout)
                    sent.first = time.monotonic()
                else:
                    response = await self._stream(payload, timeout, on_chunk, sent)
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
                    raise RequestError("invalid", str(e)) from None
                if not e.retryable or sent.any or out.attempts > self.config.backend.retries:
                    raise RequestError("unavailable", str(e)) from None
                self.dispatcher.reroutes += 1
                self.metrics.reroutes.inc()
                log.info("request %s: rerouting after %s", job.request_id, e)
            except TimeoutError:
                raise RequestError(
                    "deadline" if deadline is not None else "unavailable",
                    f"no answer from the backend within {timeout:.3g} s",
                ) from None
            finally:
                self.dispatcher.release(rank, info)
        meta = response.get("meta_info", {}) if isinstance(response, dict) else {}
        now = time.monotonic()
        out.rank, out.node = rank, rank // self.cluster.topology.gpus_per_node
        if on_chunk is None:
            out.text = str(response.get("text", ""))
            out.output_ids = [int(i) for i in response.get("output_ids", [])]
        out.prompt_tokens = int(meta.get("prompt_tokens", job.prompt_tokens))
        out.completion_tokens = int(meta.get("completion_tokens", 0))
        finish = meta.get("finish_reason")
        out.finish_reason = str(finish.get("type", "")) if isinstance(finish, dict) else ""
        out.ttft_seconds = (sent.first or now) - job.arrived
        out.total_seconds = now - job.arrived
        self._observe(job, out, prediction, meta)
        self.requests_ok += 1
        self.metrics.requests.labels("ok").inc()
        self.metrics.ttft.observe(out.ttft_seconds)
        self.metrics.total.observe(out.total_seconds)
        return out

    async def _acquire(self, info: RequestInfo, deadline: float | None) -> int:
        try:
            if deadline is None:
                return await self.dispatcher.acquire(info)
            return await asyncio.wait_for(
                self.dispatcher.acquire(info), timeout=max(0.0, deadline - time.monotonic())
            )
        except Overloaded as e:
            raise RequestError("overloaded", f"the scheduler is overloaded: {e}") from None
        except TimeoutError:
            raise RequestError("deadline", "the deadline passed while queued for a rank") from None

    def _remaining(self, deadline: float | None) -> float:
        limit = self.config.backend.request_timeout_s
        if deadline is None:
            return limit
        return max(0.001, min(limit, deadline - time.monotonic()))

    def _payload(self, job: Job, rank: int, cls: str | None) -> dict[str, Any]:
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
        if self.config.backend.return_routed_experts:
            payload["return_routed_experts"] = True
        return payload

    async def _stream(
        self, payload: dict[str, Any], timeout: float, on_chunk: Chunk, sent: _Sent
    ) -> dict[str, Any]:
        last: dict[str, Any] = {}
        text, ids = "", list[int]()
        async for chunk in self.backend.generate_stream(payload, timeout):
            new_text = str(chunk.get("text", ""))
            new_ids = [int(i) for i in chunk.get("output_ids", [])]
            # SGLang streams cumulative text and ids unless --incremental-streaming-output.
            if new_ids[: len(ids)] == ids and new_text.startswith(text):
                delta_text, delta_ids = new_text[len(text) :], new_ids[len(ids) :]
                text, ids = new_text, new_ids
            else:
                delta_text, delta_ids = new_text, new_ids
                text, ids = text + new_text, ids + new_ids
            if delta_text or delta_ids:
                if sent.first is None:
                    sent.first = time.monotonic()
                sent.any = True
                await on_chunk(delta_text, delta_ids)
            last = chunk
        return last

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
            return p.from_text(job.text, tokens)
        return Prediction(None, "none")

    async def _probe(self, job: Job, deadline: float | None, tokens: int) -> Prediction | None:
        """A one-token prefill with routed experts returned: the prompt's real routing.
        It runs where the text prediction would send the request, so SGLang's prefix
        cache can reuse its KV if the request follows it there."""
        guess = self.predictor.from_text(job.text, tokens) if job.text else Prediction(None, "none")
        info = RequestInfo(f"{job.request_id}-probe", guess.cls, guess.histogram, job.prompt_tokens)
        rank = await self._acquire(info, deadline)
        try:
            payload = self._payload(job, rank, guess.cls)
            payload["rid"] = info.request_id
            payload["sampling_params"] = {**payload["sampling_params"], "max_new_tokens": 1}
            payload["return_routed_experts"] = True
            response = await self.backend.generate(payload, self._remaining(deadline))
        except (BackendError, TimeoutError) as e:
            log.info("request %s: probe failed (%s); using the text prediction", job.request_id, e)
            return None
        finally:
            self.dispatcher.release(rank, info)
        self.probes += 1
        meta = response.get("meta_info", {})
        encoded = meta.get("routed_experts")
        if not isinstance(encoded, str):
            return None
        try:
            obs = self.feedback.measure(encoded, rank, int(meta.get("prompt_tokens", 0)))
        except ValueError as e:
            log.warning("request %s: probe routed experts unusable: %s", job.request_id, e)
            return None
        return self.predictor.from_routing(obs.prefill + obs.decode, tokens, "probe")

    def _observe(
        self, job: Job, out: Outcome, prediction: Prediction, meta: dict[str, Any]
    ) -> None:
        if prediction.histogram is not None:
            far = 1.0 - self.cluster.node_present[:, out.node]
            remote = float(np.asarray(prediction.histogram).ravel() @ far)
            estimate = remote * self.cluster.bytes_per_copy
            self.estimated_inter_node_bytes += estimate
            self.metrics.estimated_inter_node_bytes.inc(estimate)
        encoded = meta.get("routed_experts")
        if not isinstance(encoded, str):
            return
        try:
            obs = self.feedback.measure(encoded, out.rank, out.prompt_tokens)
        except ValueError as e:
            log.warning("request %s: routed experts unusable: %s", job.request_id, e)
            return
        out.local_fraction = obs.local_fraction
        out.inter_node_bytes = float(obs.inter_node_bytes)
        self.feedback.record(
            obs, prediction.cls, out.rank, job.text or "", predicted=prediction.source != "none"
        )
        self.predictor.remember(job.conversation_id, obs.prefill + obs.decode)
        m = self.metrics
        m.inter_node_bytes.inc(obs.inter_node_bytes)
        m.remote_hits.inc(obs.remote_hits)
        m.token_layers.inc(obs.token_layers)
        m.prediction_hit_ratio.set(self.feedback.prediction_hit_rate)

    def count_failure(self, outcome: str) -> None:
        self.requests_failed += 1
        self.metrics.requests.labels(outcome).inc()


@dataclass
class _Sent:
    first: float | None = None
    any: bool = False


def _sglang_sampling(sampling: dict[str, Any]) -> dict[str, Any]:
    out = dict(sampling)
    if "seed" in out:
        out["sampling_seed"] = out.pop("seed")
    return out
