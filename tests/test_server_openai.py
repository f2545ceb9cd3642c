"""The OpenAI front door on loopback, driven by the official ``openai`` package: chat and
completion, streamed and not, a bad model, a bad key, a cancelled stream; and the gRPC
Chat / ChatStream. Each request lands on the rank the policy chose (the emulator's log
and the scheduler's dispatch counts agree) and its routed experts reach the accounting."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from scheduler.cli import main
from scheduler.client import SchedulerClient
from tests.emulator_harness import MODEL, EmulatorServer, make_emulator
from tests.server_harness import SchedulerServer, write_config

KEY = "sk-test-key"


def _config(tmp_path: Path, url: str, **server: Any) -> Path:
    return write_config(
        tmp_path,
        url,
        server={"openai_listen": "127.0.0.1:0", **server},
        backend={"routed_experts_budget_cores": 0.0},
        policy={"name": "total_requests", "capacity": 4, "window_ms": 0.0},
    )


def _client(s: SchedulerServer, key: str = "none") -> openai.OpenAI:
    assert s.running is not None and s.running.openai_url
    return openai.OpenAI(base_url=f"{s.running.openai_url}/v1", api_key=key, max_retries=0)


def _stats(s: SchedulerServer) -> Any:
    async def go() -> Any:
        async with SchedulerClient(s.target) as client:
            return await client.stats()

    return asyncio.run(go())


def _wait_accounted(s: SchedulerServer, count: int) -> Any:
    deadline = time.monotonic() + 10
    while True:
        stats = _stats(s)
        if stats.telemetry_accounted >= count or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def _served(emu: EmulatorServer) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = emu.emulator.requests.to_json()["requests"]
    return rows


def _assert_on_chosen_ranks(s: SchedulerServer, emu: EmulatorServer, requests: int) -> None:
    """Every request was pinned, and served where the scheduler dispatched it."""
    served = _served(emu)
    assert len(served) == requests
    assert {row["pinned_field"] for row in served} == {"routed_dp_rank"}
    per_rank = [0] * emu.emulator.config.num_ranks
    for row in served:
        per_rank[row["dp_rank"]] += 1
    assert [r.dispatched for r in _stats(s).ranks] == per_rank


def test_chat_and_completion_streamed_and_not_through_the_openai_package(tmp_path: Path) -> None:
    emu = EmulatorServer(make_emulator(time_scale=0.0))
    with emu, SchedulerServer(_config(tmp_path, emu.url)) as s, _client(s) as client:
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "solve 2x + 3 = 7 for x"},
        ]
        chat = client.chat.completions.create(model=MODEL.name, messages=messages, max_tokens=8)
        assert chat.object == "chat.completion"
        assert chat.choices[0].message.role == "assistant"
        assert chat.choices[0].message.content
        assert chat.usage is not None and chat.usage.completion_tokens == 8

        chunks = list(
            client.chat.completions.create(
                model=MODEL.name,
                messages=messages,
                max_tokens=8,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
        assert all(c.choices for c in chunks[:-1])  # no routed-experts chunk relayed
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

        completion = client.completions.create(model=MODEL.name, prompt="def f(x):", max_tokens=5)
        assert completion.choices[0].text and completion.usage is not None
        assert completion.usage.completion_tokens == 5
        pieces = list(
            client.completions.create(
                model=MODEL.name, prompt="def f(x):", max_tokens=5, stream=True
            )
        )
        assert "".join(p.choices[0].text for p in pieces if p.choices)
        assert all(p.usage is None for p in pieces)  # not asked for: not relayed

        models = client.models.list()
        assert MODEL.name in [m.id for m in models.data]

        _assert_on_chosen_ranks(s, emu, 4)
        stats = _wait_accounted(s, 4)
        assert stats.telemetry_accounted == 4 and stats.token_layers > 0
        assert stats.outcomes["ok"] == 4


def test_a_bad_model_a_bad_key_and_a_cancelled_stream(tmp_path: Path) -> None:
    key_file = tmp_path / "openai.key"
    key_file.write_text(KEY + "\n")
    emu = EmulatorServer(make_emulator(time_scale=1.0))
    with emu, SchedulerServer(_config(tmp_path, emu.url, openai_api_key_file=str(key_file))) as s:
        with _client(s, "wrong") as wrong, pytest.raises(openai.AuthenticationError) as denied:
            wrong.models.list()
        assert denied.value.status_code == 401
        with _client(s, KEY) as client:
            with pytest.raises(openai.NotFoundError) as missing:
                client.chat.completions.create(
                    model="gpt-4", messages=[{"role": "user", "content": "hi"}]
                )
            assert missing.value.code == "model_not_found"
            with pytest.raises(openai.BadRequestError) as bad:
                client.completions.create(model=MODEL.name, prompt="x", max_tokens=5, n=2)
            assert "n must be 1" in str(bad.value)
            late = {"X-Request-Timeout": "0.3"}  # the deadline, as a gRPC call's
            with pytest.raises(openai.InternalServerError) as timed_out:
                client.completions.create(
                    model=MODEL.name, prompt="x", max_tokens=2000, extra_headers=late
                )
            assert timed_out.value.status_code == 504

            stream = client.chat.completions.create(
                model=MODEL.name,
                messages=[{"role": "user", "content": "tell me a long story"}],
                max_tokens=2000,
                stream=True,
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    break
            stream.close()  # the client goes away mid-stream
            deadline = time.monotonic() + 10
            while _stats(s).outcomes["cancelled"] < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            stats = _stats(s)
            assert stats.outcomes["cancelled"] == 1 and stats.in_progress == 0
            while "cancelled" not in [r["outcome"] for r in _served(emu)]:
                assert time.monotonic() < deadline, "SGLang's request was not cancelled"
                time.sleep(0.05)
            assert stats.outcomes["invalid"] == 2  # the bad model and n=2 (not the key)
            assert stats.outcomes["client_deadline"] == 1
            assert all(r.in_flight == 0 for r in stats.ranks)  # its slot was given back


def test_grpc_chat_and_chat_stream_and_the_client_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emu = EmulatorServer(make_emulator(time_scale=0.0))
    with emu, SchedulerServer(_config(tmp_path, emu.url)) as s:

        async def go() -> tuple[Any, list[Any]]:
            async with SchedulerClient(s.target) as client:
                messages = [("user", "solve 2x + 3 = 7 for x")]
                reply = await client.chat(messages, max_new_tokens=6, request_id="c1")
                chunks = [c async for c in client.chat_stream(messages, max_new_tokens=6)]
                return reply, chunks

        reply, chunks = asyncio.run(go())
        assert reply.request_id == "c1" and reply.message.role == "assistant"
        assert reply.message.content and reply.info.completion_tokens == 6
        assert reply.info.prediction_source == "text" and reply.info.predicted_class
        assert "".join(c.content for c in chunks[:-1])
        assert chunks[-1].finished and chunks[-1].info.completion_tokens == 6
        _assert_on_chosen_ranks(s, emu, 2)

        base = ["client", "--server", s.target]
        assert main([*base, "chat", "solve 2x = 4", "--system", "Be brief."]) == 0
        reply = json.loads(capsys.readouterr().out)
        assert reply["message"]["role"] == "assistant" and reply["message"]["content"]
        assert main([*base, "chat", "hi", "--max-new-tokens", "4", "--stream"]) == 0
        printed = capsys.readouterr().out
        assert json.loads(printed[printed.index("{") :])["completion_tokens"] == 4
        assert main([*base, "generate", "hi", "--max-new-tokens", "4"]) == 0
        assert json.loads(capsys.readouterr().out)["info"]["completion_tokens"] == 4
