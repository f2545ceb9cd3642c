"""``moe_scheduler.v1.Scheduler`` over grpc.aio: messages in and out of
:class:`~scheduler.server.core.SchedulerCore`, errors as status codes."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import grpc

from scheduler.api.v1 import scheduler_pb2 as pb
from scheduler.api.v1 import scheduler_pb2_grpc as pb_grpc
from scheduler.server.core import Outcome, RequestError, SchedulerCore

log = logging.getLogger("moe_scheduler.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Scheduler"].full_name

_CODES = {
    "invalid": (grpc.StatusCode.INVALID_ARGUMENT, "invalid"),
    "overloaded": (grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded"),
    "unavailable": (grpc.StatusCode.UNAVAILABLE, "backend_error"),
    "deadline": (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline"),
}


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


def info_message(out: Outcome) -> pb.RequestInfo:
    info = pb.RequestInfo(
        dp_rank=out.rank,
        node=out.node,
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
    if out.local_fraction is not None:
        info.local_fraction = out.local_fraction
    if out.inter_node_bytes is not None:
        info.inter_node_bytes = out.inter_node_bytes
    return info


class SchedulerService(pb_grpc.SchedulerServicer):
    def __init__(self, core: SchedulerCore) -> None:
        self.core = core

    async def _serve(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, stream: bool
    ) -> Outcome | None:
        core = self.core
        try:
            job = core.validate(request_fields(request))
        except RequestError as e:
            core.count_failure("invalid")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining

        async def on_chunk(text: str, ids: list[int]) -> None:
            await context.write(
                pb.GenerateChunk(request_id=job.request_id, text=text, output_ids=ids)
            )

        try:
            out = await core.run(job, deadline, on_chunk if stream else None)
        except RequestError as e:
            code, outcome = _CODES[e.code]
            core.count_failure(outcome)
            log.info("request %s: %s %s", job.request_id, code.name, e)
            await context.abort(code, str(e))
        except asyncio.CancelledError:
            expired = deadline is not None and time.monotonic() >= deadline
            core.count_failure("deadline" if expired else "cancelled")
            log.info(
                "request %s: %s by the client",
                job.request_id,
                "deadline passed" if expired else "cancelled",
            )
            raise
        log.debug("request %s: rank %d, %s", job.request_id, out.rank, out.prediction_source)
        return out

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        out = await self._serve(request, context, stream=False)
        assert out is not None
        return pb.GenerateResponse(
            request_id=out.request_id,
            text=out.text,
            output_ids=out.output_ids,
            info=info_message(out),
        )

    async def GenerateStream(  # noqa: N802
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> None:
        out = await self._serve(request, context, stream=True)
        assert out is not None
        await context.write(
            pb.GenerateChunk(request_id=out.request_id, finished=True, info=info_message(out))
        )

    async def GetPlacement(  # noqa: N802
        self, request: pb.GetPlacementRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPlacementResponse:
        c = self.core.cluster
        return pb.GetPlacementResponse(
            version=c.version,
            nodes=c.topology.nodes,
            gpus_per_node=c.topology.gpus_per_node,
            model=c.model.name,
            policy=self.core.config.policy.name,
            expert_location_json=c.expert_location_text,
            plan_json=c.plan_text,
        )

    async def GetStats(  # noqa: N802
        self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetStatsResponse:
        core, d, fb = self.core, self.core.dispatcher, self.core.feedback
        per_node = core.cluster.topology.gpus_per_node
        healthy = d.healthy()
        ranks = [
            pb.RankStats(
                rank=r,
                node=r // per_node,
                healthy=bool(healthy[r]),
                in_flight=int(d.in_flight[r]),
                capacity=d.capacity,
                backend_running=int(d.backend_running[r]),
                backend_waiting=int(d.backend_waiting[r]),
                dispatched=int(d.dispatched[r]),
            )
            for r in range(d.num_ranks)
        ]
        return pb.GetStatsResponse(
            ranks=ranks,
            requests_ok=core.requests_ok,
            requests_failed=core.requests_failed,
            queued=d.queued,
            token_layers=fb.token_layers,
            remote_hits=fb.remote_hits,
            inter_node_bytes=float(fb.inter_node_bytes),
            inter_node_bytes_per_token=fb.inter_node_bytes / fb.tokens if fb.tokens else 0.0,
            estimated_inter_node_bytes=core.estimated_inter_node_bytes,
            prediction_hit_rate=fb.prediction_hit_rate,
            prediction_checks=fb.prediction_checks,
            reroutes=d.reroutes,
            config_version=core.config.version,
            uptime_seconds=time.monotonic() - core.started,
        )

    async def GetFeedback(  # noqa: N802
        self, request: pb.GetFeedbackRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetFeedbackResponse:
        fb = self.core.feedback
        profile = fb.profile()
        return pb.GetFeedbackResponse(
            profile_json="" if profile is None else json.dumps(profile.to_json()),
            requests=sum(c.requests for c in profile.classes.values()) if profile else 0,
            tokens=fb.tokens,
            placement_version=self.core.cluster.version,
        )

    async def ReloadConfig(  # noqa: N802
        self, request: pb.ReloadConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReloadConfigResponse:
        ok, message = self.core.reload()
        return pb.ReloadConfigResponse(
            ok=ok, message=message, config_version=self.core.config.version
        )
