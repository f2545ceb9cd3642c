"""``moe_scheduler.v1.Scheduler`` over grpc.aio: messages in and out of
:class:`~scheduler.server.core.SchedulerCore`, outcomes as status codes.

Every Generate / GenerateStream call ends in exactly one outcome (``metrics.OUTCOMES``),
counted once when grpc reports the call done, that is after its last message and status
went out: a client that cancelled or whose deadline passed is told apart from an answer
it received. An unexpected error becomes INTERNAL with its cause logged, never UNKNOWN;
an undecodable request message becomes INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from scheduler.api.v1 import scheduler_pb2 as pb
from scheduler.errors import RequestError
from scheduler.server.backend import CHAT
from scheduler.server.core import (
    Chunk,
    EventChunk,
    Job,
    Outcome,
    SchedulerCore,
    quote,
)
from scheduler.server.openai_requests import parse

log = logging.getLogger("moe_scheduler.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Scheduler"].full_name

STATUS = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "refused_deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
    "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
    "client_deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
    "backend_error": grpc.StatusCode.UNAVAILABLE,
    "internal": grpc.StatusCode.INTERNAL,
}


#: How close to its deadline a client's cancel counts as the deadline passing, and an
#: answer handed to grpc as too late (see _Call).
CANCEL_MARGIN_S = 0.025
ANSWER_MARGIN_S = 0.001


@dataclass(frozen=True)
class BadMessage:
    """A request message that did not decode (invalid UTF-8, truncated, bad tag)."""

    reason: str


def _safe(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as e:  # protobuf's DecodeError and whatever else a parser raises
            return BadMessage(str(e)[:200] or type(e).__name__)

    return deserialize


def request_fields(request: pb.GenerateRequest) -> dict[str, Any]:
    """The fields :func:`~scheduler.server.core.validate` reads, from a message."""
    sampling: dict[str, Any] = {}
    sp = request.sampling
    for name in ("max_new_tokens", "temperature", "top_p", "top_k", "seed"):
        if sp.HasField(name):
            sampling[name] = getattr(sp, name)
    if sp.stop:
        sampling["stop"] = list(sp.stop)
    which = request.WhichOneof("input")
    return {
        "request_id": request.request_id,
        "text": request.text if which == "text" else None,
        "input_ids": list(request.input_ids.ids) if which == "input_ids" else None,
        "sampling": sampling,
        "class_hint": request.class_hint,
        "conversation_id": request.conversation_id,
    }


def chat_body(request: pb.ChatRequest, model: str) -> dict[str, Any]:
    """The OpenAI chat body of a ChatRequest (``model``: the one served, when the
    request names none)."""
    body: dict[str, Any] = {
        "model": request.model or model,
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
    }
    sp = request.sampling
    if sp.HasField("max_new_tokens"):
        body["max_tokens"] = sp.max_new_tokens
    for name in ("temperature", "top_p", "top_k", "seed"):
        if sp.HasField(name):
            body[name] = getattr(sp, name)
    if sp.stop:
        body["stop"] = list(sp.stop)
    for name in ("class_hint", "conversation_id"):
        if getattr(request, name):
            body[name] = getattr(request, name)
    return body


def info_message(out: Outcome) -> pb.RequestInfo:
    info = pb.RequestInfo(
        dp_rank=out.dp_rank,
        node=out.node,
        instance=out.instance,
        prefill_instance=out.prefill_instance,
        predicted_class=out.predicted_class,
        prediction_source=out.prediction_source,
        prompt_tokens=out.prompt_tokens,
        completion_tokens=out.completion_tokens,
        finish_reason=out.finish_reason,
        queue_seconds=out.queue_seconds,
        ttft_seconds=out.ttft_seconds,
        total_seconds=out.total_seconds,
        attempts=out.attempts,
    )
    if out.prefill_dp_rank >= 0:
        info.prefill_dp_rank = out.prefill_dp_rank
    if out.local_fraction is not None:
        info.local_fraction = out.local_fraction
    if out.inter_node_bytes is not None:
        info.inter_node_bytes = out.inter_node_bytes
    return info


class _Call:
    """One Generate call's outcome, settled when grpc says the call is done."""

    def __init__(self, core: SchedulerCore, context: grpc.aio.ServicerContext) -> None:
        self.core = core
        self.outcome: str | None = None
        remaining = context.time_remaining()
        self.deadline = None if remaining is None else time.monotonic() + remaining
        core.in_progress += 1
        core.metrics.in_progress.inc()
        context.add_done_callback(self._done)

    def _late(self, margin_s: float) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline - margin_s

    def cancelled(self) -> None:
        """The handler was cancelled: grpc saw the client cancel or its deadline pass.
        The server's deadline is the client's plus the request's transit (longer when
        this loop is busy), while the client's cancel arrives at once: a cancel this
        close to the deadline, allowing for how late the loop runs, is the client's
        deadline."""
        margin = CANCEL_MARGIN_S + self.core.loop_lag_s
        self.outcome = "client_deadline" if self._late(margin) else "cancelled"

    def answered(self) -> None:
        """The answer is written (a stream) or handed to grpc (unary). grpc.aio does not
        say whether it reached the client: one handed over after the deadline did not
        (the client saw DEADLINE_EXCEEDED)."""
        self.outcome = "client_deadline" if self._late(ANSWER_MARGIN_S) else "ok"

    def _done(self, context: grpc.aio.ServicerContext) -> None:
        core = self.core
        core.in_progress -= 1
        core.metrics.in_progress.dec()
        core.count(self.outcome or "internal")


class _Relay:
    """Streamed tokens to the client, coalesced while a write is in flight: one message
    per SGLang chunk while the client and this loop keep up, fewer and larger messages
    when they do not (a gRPC write costs far more CPU than reading a chunk); and at most
    one message per ``min_interval_s`` after the first (``server.stream_interval_ms``).
    The reading side never waits for the client."""

    def __init__(
        self,
        context: grpc.aio.ServicerContext,
        min_interval_s: float = 0.0,
        message: Callable[[str, str, list[int]], Any] | None = None,
    ) -> None:
        self._context = context
        self._min_interval_s = min_interval_s
        #: (request id, text, ids) -> the message to write (default: a GenerateChunk).
        self._message = message or (
            lambda rid, text, ids: pb.GenerateChunk(request_id=rid, text=text, output_ids=ids)
        )
        self.request_id = ""
        self._text: list[str] = []
        self._ids: list[int] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def push_event(self, text: str, event: bytes | None) -> None:
        """An OpenAI stream's chunk: its new content (the event itself is not relayed)."""
        if text:
            await self.push(text, [])

    async def push(self, text: str, ids: list[int]) -> None:
        self._text.append(text)
        self._ids += ids
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        elif self._task.done():
            self._gone()
        self._wake.set()

    def _gone(self) -> None:
        """A write failed: the call is over on grpc's side (the client went away)."""
        error = None if self._task is None or self._task.cancelled() else self._task.exception()
        if error is not None:
            raise asyncio.CancelledError(f"the client went away ({error})") from error

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._text or self._ids:
                text, ids = "".join(self._text), self._ids
                self._text, self._ids = [], []
                await self._context.write(self._message(self.request_id, text, ids))
                if self._min_interval_s and not self._closing:
                    await asyncio.sleep(self._min_interval_s)
            if self._closing:
                return

    async def drain(self) -> None:
        """Write what is pending and stop: grpc allows one write at a time, so a call
        can end (its last message, or an error status) only once this returned."""
        if self._task is not None:
            self._closing = True
            self._wake.set()
            await asyncio.wait({self._task})

    async def finish(self, last: Any) -> None:
        """Write what is pending, then ``last``."""
        await self.drain()
        self._gone()
        await self._context.write(last)

    def cancel(self) -> None:
        if self._task is None:
            return
        if self._task.done():
            if not self._task.cancelled():
                self._task.exception()  # seen: the call's outcome already says why
        else:
            self._task.cancel()


class SchedulerService:
    def __init__(self, core: SchedulerCore) -> None:
        self.core = core

    def _job(self, request: Any) -> Job:
        """The Job of a GenerateRequest or ChatRequest; raises RequestError."""
        core = self.core
        if isinstance(request, pb.ChatRequest):
            models = core.model_names()
            body = chat_body(request, models[0])
            return parse(CHAT, body, core.config, core.cluster, models, request.request_id).job
        return core.validate(request_fields(request))

    async def _serve(
        self,
        request: pb.GenerateRequest | pb.ChatRequest | BadMessage,
        context: grpc.aio.ServicerContext,
        relay: _Relay | None,
    ) -> tuple[_Call, Outcome]:
        core = self.core
        refused = core.refuse_new_call()
        call = _Call(core, context)
        if refused is not None:
            call.outcome = "overloaded"
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"the scheduler is overloaded: {refused}"
            )
        try:
            if isinstance(request, BadMessage):
                log.info("request with an undecodable message: %s", request.reason)
                raise RequestError(
                    "invalid", f"the request message does not decode: {request.reason}"
                )
            job = self._job(request)
        except RequestError as e:
            call.outcome = e.outcome
            if not isinstance(request, BadMessage):
                log.info("request %s: invalid: %s", quote(request.request_id), e)
            await context.abort(STATUS[e.outcome], str(e))

        on_chunk: Chunk | EventChunk | None = None
        if relay is not None:
            relay.request_id = job.request_id
            on_chunk = relay.push if job.openai is None else relay.push_event
        try:
            out = await core.run(job, call.deadline, on_chunk)
        except RequestError as e:
            call.outcome = e.outcome
            log.info("request %s: %s: %s", job.request_id, e.outcome, e)
            if relay is not None:  # the tokens already relayed, then the status
                await relay.drain()
            await context.abort(STATUS[e.outcome], str(e))
        except asyncio.CancelledError:
            call.cancelled()
            log.info("request %s: %s by the client", job.request_id, call.outcome)
            raise
        log.debug("request %s: rank %d, %s", job.request_id, out.rank, out.prediction_source)
        return call, out

    async def generate(
        self, request: pb.GenerateRequest | BadMessage, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        call, out = await self._serve(request, context, None)
        response = pb.GenerateResponse(
            request_id=out.request_id,
            text=out.text,
            output_ids=out.output_ids,
            info=info_message(out),
        )
        call.answered()
        return response

    async def generate_stream(
        self, request: pb.GenerateRequest | BadMessage, context: grpc.aio.ServicerContext
    ) -> None:
        await self._stream(request, context, pb.GenerateChunk, None)

    async def _stream(
        self,
        request: pb.GenerateRequest | pb.ChatRequest | BadMessage,
        context: grpc.aio.ServicerContext,
        chunk: type[pb.GenerateChunk] | type[pb.ChatChunk],
        message: Callable[[str, str, list[int]], Any] | None,
    ) -> None:
        """A streaming call: relayed chunks (``message``), then a last ``chunk`` with the
        request's info."""
        relay = _Relay(context, self.core.config.server.stream_interval_ms / 1000, message)
        try:
            call, out = await self._serve(request, context, relay)
            last = chunk(request_id=out.request_id, finished=True, info=info_message(out))
            try:
                await relay.finish(last)
            except asyncio.CancelledError:
                call.cancelled()
                raise
            call.answered()
        finally:
            relay.cancel()

    async def chat(
        self, request: pb.ChatRequest | BadMessage, context: grpc.aio.ServicerContext
    ) -> pb.ChatResponse:
        call, out = await self._serve(request, context, None)
        response = pb.ChatResponse(
            request_id=out.request_id,
            message=pb.ChatMessage(role="assistant", content=out.text),
            info=info_message(out),
        )
        call.answered()
        return response

    async def chat_stream(
        self, request: pb.ChatRequest | BadMessage, context: grpc.aio.ServicerContext
    ) -> None:
        def message(rid: str, text: str, ids: list[int]) -> pb.ChatChunk:
            return pb.ChatChunk(request_id=rid, content=text)

        await self._stream(request, context, pb.ChatChunk, message)

    async def get_placement(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> pb.GetPlacementResponse:
        c, versions = self.core.cluster, self.core.sglang_versions
        instances = [
            pb.InstancePlacement(
                name=i.name,
                url=i.url,
                role=i.role,
                version=i.version,
                nodes=i.topology.nodes,
                gpus_per_node=i.topology.gpus_per_node,
                sglang_version=str(versions[i.name] or ""),
                expert_location_json=i.expert_location_text,
                plan_json=i.plan_text,
            )
            for i in c.instances
        ]
        one = c.instances[0] if len(c.instances) == 1 else None
        return pb.GetPlacementResponse(
            version=c.version,
            nodes=c.topology.nodes,
            gpus_per_node=c.topology.gpus_per_node,
            model=c.model.name,
            policy=self.core.config.policy.name,
            expert_location_json=one.expert_location_text if one else "",
            plan_json=one.plan_text if one else "",
            instances=instances,
        )

    async def get_stats(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> pb.GetStatsResponse:
        core, fb = self.core, self.core.feedback
        per_node = core.cluster.topology.gpus_per_node
        ranks = []
        for inst in core.cluster.instances:
            d = core.dispatchers[inst.role]
            healthy = d.healthy()
            ranks += [
                pb.RankStats(
                    rank=local,
                    node=local // per_node,
                    healthy=bool(healthy[r]),
                    in_flight=int(d.in_flight[r]),
                    capacity=d.capacity,
                    backend_running=int(d.backend_running[r]),
                    backend_waiting=int(d.backend_waiting[r]),
                    dispatched=int(d.dispatched[r]),
                    instance=inst.name,
                    role=inst.role,
                )
                for local, r in enumerate(core.pool_ranks(inst))
            ]
        queued = sum(d.queued for d in core.dispatchers.values())
        reroutes = core.dispatcher.reroutes
        t = core.telemetry
        return pb.GetStatsResponse(
            ranks=ranks,
            requests_ok=core.requests_ok,
            requests_failed=core.requests_failed,
            queued=queued,
            token_layers=fb.token_layers,
            remote_hits=fb.remote_hits,
            inter_node_bytes=float(fb.inter_node_bytes),
            inter_node_bytes_per_token=fb.inter_node_bytes / fb.tokens if fb.tokens else 0.0,
            estimated_inter_node_bytes=core.estimated_inter_node_bytes,
            prediction_hit_rate=fb.prediction_hit_rate,
            prediction_checks=fb.prediction_checks,
            reroutes=reroutes,
            config_version=core.config.version,
            uptime_seconds=time.monotonic() - core.started,
            outcomes=core.outcomes,
            in_progress=core.in_progress,
            telemetry_sampled=core.sampler.asked,
            telemetry_accounted=t.accounted,
            telemetry_dropped=t.dropped + t.failed,
            text_predictor=core.cluster.text_predictor,
            text_predictor_reason=core.cluster.text_predictor_why,
        )

    async def get_feedback(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> pb.GetFeedbackResponse:
        fb = self.core.feedback
        profile = fb.profile()
        return pb.GetFeedbackResponse(
            profile_json="" if profile is None else json.dumps(profile.to_json()),
            requests=sum(c.requests for c in profile.classes.values()) if profile else 0,
            tokens=fb.tokens,
            placement_version=self.core.cluster.version,
        )

    async def reload_config(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> pb.ReloadConfigResponse:
        await self._authorize(context, "ReloadConfig")
        ok, message = await self.core.reload()
        return pb.ReloadConfigResponse(
            ok=ok, message=message, config_version=self.core.config.version
        )

    async def _authorize(self, context: grpc.aio.ServicerContext, method: str) -> None:
        """Admin RPCs need ``authorization: Bearer <server admin token>``."""
        token, counter = self.core.admin_token, self.core.metrics.admin_calls
        if not token:
            counter.labels(method, "denied").inc()
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} is an admin RPC and no admin token is configured "
                "(server.admin_token_file or $MOE_SCHEDULER_ADMIN_TOKEN); SIGHUP reloads locally",
            )
        sent = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                sent = value
        scheme, _, given = sent.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            counter.labels(method, "unauthenticated").inc()
            log.warning("%s refused: missing or wrong bearer token from %s", method, context.peer())
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, f"{method} needs the admin bearer token"
            )
        counter.labels(method, "ok").inc()


Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _internal_on_error(method: str, fn: Handler) -> Handler:
    """``fn`` whose unexpected errors (bugs) become INTERNAL with the cause logged, never
    UNKNOWN; a Generate call left without an outcome is counted ``internal``."""

    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:
            log.exception("%s: internal error", method)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")

    return handler


def handlers(service: SchedulerService) -> grpc.GenericRpcHandler:
    """Every method of the proto service, with request decoding that never raises."""
    implementations = {
        "Generate": service.generate,
        "GenerateStream": service.generate_stream,
        "Chat": service.chat,
        "ChatStream": service.chat_stream,
        "GetPlacement": service.get_placement,
        "GetStats": service.get_stats,
        "GetFeedback": service.get_feedback,
        "ReloadConfig": service.reload_config,
    }
    table = {}
    for method in pb.DESCRIPTOR.services_by_name["Scheduler"].methods:
        request = getattr(pb, method.input_type.name)
        response = getattr(pb, method.output_type.name)
        kind = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        table[method.name] = kind(
            _internal_on_error(method.name, implementations[method.name]),
            _safe(request.FromString),
            response.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, table)
