"""Python client of the scheduler's gRPC API (``moe_scheduler.v1.Scheduler``).

async with SchedulerClient("127.0.0.1:50051") as client:
    reply = await client.generate("Solve 2x + 3 = 7", max_new_tokens=32)
    print(reply.text, reply.info.dp_rank)
    reply = await client.chat([("user", "Solve 2x + 3 = 7")], max_new_tokens=32)
    print(reply.message.content)

TLS: ``tls_ca`` (PEM bytes of the CA that signed the server's certificate), and
``tls_cert``/``tls_key`` for a client certificate. ``token``: the admin bearer token,
sent with admin RPCs (ReloadConfig) only.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from scheduler.api.v1 import scheduler_pb2 as pb
from scheduler.api.v1 import scheduler_pb2_grpc as pb_grpc
from scheduler.errors import ConfigError
from scheduler.jsonio import write_json_atomic


def _sampling(max_new_tokens: int | None, temperature: float | None) -> pb.SamplingParams:
    sampling = pb.SamplingParams()
    if max_new_tokens is not None:
        sampling.max_new_tokens = max_new_tokens
    if temperature is not None:
        sampling.temperature = temperature
    return sampling


def make_chat_request(
    messages: list[tuple[str, str]],
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    class_hint: str = "",
    request_id: str = "",
    conversation_id: str = "",
    model: str = "",
) -> pb.ChatRequest:
    """A ChatRequest of (role, content) messages."""
    return pb.ChatRequest(
        request_id=request_id,
        messages=[pb.ChatMessage(role=role, content=content) for role, content in messages],
        sampling=_sampling(max_new_tokens, temperature),
        class_hint=class_hint,
        conversation_id=conversation_id,
        model=model,
    )


def make_request(
    prompt: str | list[int],
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    class_hint: str = "",
    request_id: str = "",
    conversation_id: str = "",
) -> pb.GenerateRequest:
    """A GenerateRequest for a text prompt or a list of token ids."""
    sampling = _sampling(max_new_tokens, temperature)
    request = pb.GenerateRequest(
        request_id=request_id,
        sampling=sampling,
        class_hint=class_hint,
        conversation_id=conversation_id,
    )
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.input_ids.ids.extend(prompt)
    return request


class SchedulerClient:
    """An async client over one channel; use as ``async with``."""

    def __init__(
        self,
        target: str,
        *,
        token: str = "",
        tls_ca: bytes | None = None,
        tls_cert: bytes | None = None,
        tls_key: bytes | None = None,
    ) -> None:
        self.target = target
        self.token = token
        if tls_ca is None and tls_cert is None:
            self.channel = grpc.aio.insecure_channel(target)
        else:
            credentials = grpc.ssl_channel_credentials(tls_ca, tls_key, tls_cert)
            self.channel = grpc.aio.secure_channel(target, credentials)
        self.stub = pb_grpc.SchedulerStub(self.channel)

    async def __aenter__(self) -> SchedulerClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait for the channel to connect; TimeoutError after ``timeout_s``."""
        await asyncio.wait_for(self.channel.channel_ready(), timeout=timeout_s)

    async def generate(
        self, prompt: str | list[int], *, timeout: float | None = None, **kwargs: Any
    ) -> pb.GenerateResponse:
        response: pb.GenerateResponse = await self.stub.Generate(
            make_request(prompt, **kwargs), timeout=timeout
        )
        return response

    async def generate_stream(
        self, prompt: str | list[int], *, timeout: float | None = None, **kwargs: Any
    ) -> AsyncIterator[pb.GenerateChunk]:
        call = self.stub.GenerateStream(make_request(prompt, **kwargs), timeout=timeout)
        async for chunk in call:
            yield chunk

    async def chat(
        self, messages: list[tuple[str, str]], *, timeout: float | None = None, **kwargs: Any
    ) -> pb.ChatResponse:
        response: pb.ChatResponse = await self.stub.Chat(
            make_chat_request(messages, **kwargs), timeout=timeout
        )
        return response

    async def chat_stream(
        self, messages: list[tuple[str, str]], *, timeout: float | None = None, **kwargs: Any
    ) -> AsyncIterator[pb.ChatChunk]:
        call = self.stub.ChatStream(make_chat_request(messages, **kwargs), timeout=timeout)
        async for chunk in call:
            yield chunk

    async def stats(self) -> pb.GetStatsResponse:
        response: pb.GetStatsResponse = await self.stub.GetStats(pb.GetStatsRequest())
        return response

    async def placement(self) -> pb.GetPlacementResponse:
        response: pb.GetPlacementResponse = await self.stub.GetPlacement(pb.GetPlacementRequest())
        return response

    async def feedback(self) -> pb.GetFeedbackResponse:
        response: pb.GetFeedbackResponse = await self.stub.GetFeedback(pb.GetFeedbackRequest())
        return response

    async def reload(self) -> pb.ReloadConfigResponse:
        metadata = (("authorization", f"Bearer {self.token}"),) if self.token else None
        response: pb.ReloadConfigResponse = await self.stub.ReloadConfig(
            pb.ReloadConfigRequest(), metadata=metadata
        )
        return response


def save_feedback_profile(target: str, out: Path) -> Path:
    """The scheduler's feedback profile, saved beside ``out`` as ``<out>.profile.json``."""

    async def fetch() -> str:
        async with SchedulerClient(target) as client:
            return (await client.feedback()).profile_json

    try:
        text = asyncio.run(asyncio.wait_for(fetch(), timeout=30))
    except (grpc.aio.AioRpcError, TimeoutError) as e:
        detail = e.details() if isinstance(e, grpc.aio.AioRpcError) else "no answer in 30 s"
        raise ConfigError(f"--from-server {target}: {detail}") from e
    if not text:
        raise ConfigError(
            f"--from-server {target}: no feedback yet (no finished request returned routed "
            "experts; is backend.return_routed_experts on?)"
        )
    path = out.with_name(out.name + ".profile.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, json.loads(text))
    print(f"profile from {target} written to {path}", file=sys.stderr)
    return path
