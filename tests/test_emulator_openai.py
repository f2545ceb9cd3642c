"""The emulator's OpenAI endpoints (/v1/chat/completions, /v1/completions) over real HTTP
on loopback, checked against the shapes SGLang 0.5.23's OpenAI layer writes."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import urllib.error
import urllib.request
from typing import Any

import aiohttp
import numpy as np
import pytest

from scheduler.emulator.core import estimate_prompt_tokens
from scheduler.emulator.openai_api import render_messages
from scheduler.traces.importers.sglang_generate import decode_routed_experts
from tests.emulator_harness import (
    MODEL,
    STARTUP_TIMEOUT_S,
    EmulatorServer,
    get,
    make_emulator,
    post,
)

CODE_PROMPT = "def add(a, b):\n    return a + b\n"
QUESTION = "What is 12 times 7? Show your work."
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
]
RENDERED = render_messages([("system", "You are terse."), ("user", QUESTION)])
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def server():
    with EmulatorServer(make_emulator(prompts=[(CODE_PROMPT, "code")])) as s:
        yield s


def call(
    server: EmulatorServer, path: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, Any, str]:
    """POST; (status, parsed body or the SSE ``data:`` payloads, content type)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        server.url + path,
        data=data,
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        response = urllib.request.urlopen(request, timeout=STARTUP_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        response = e
    with response:
        ctype = response.headers.get("Content-Type", "")
        raw = response.read().decode()
    if ctype.startswith("text/event-stream"):
        assert raw.endswith("data: [DONE]\n\n")
        events = raw.split("\n\n")[:-1]
        assert all(e.startswith("data: ") for e in events), events
        payloads = [e[len("data: ") :] for e in events]
        return response.status, [json.loads(p) for p in payloads[:-1]], ctype
    return response.status, json.loads(raw), ctype


def ok(server: EmulatorServer, path: str, body: Any, **kw: Any) -> Any:
    status, response, _ = call(server, path, body, **kw)
    assert status == 200, response
    return response


def last_request(server: EmulatorServer) -> dict[str, Any]:
    return get(server.url + "/admin/requests")[1]["requests"][-1]


USAGE_KEYS = [
    "prompt_tokens",
    "total_tokens",
    "completion_tokens",
    "prompt_tokens_details",
    "reasoning_tokens",
    "completion_tokens_details",
]


def test_chat_answers_as_sglang_with_the_prompt_counted_like_generate(server):
    response = ok(server, CHAT, {"messages": MESSAGES, "max_tokens": 4, "rid": "chat-1"})
    assert last_request(server)["rid"] == "chat-1"
    native = post(
        server.url + "/generate", {"text": RENDERED, "sampling_params": {"max_new_tokens": 4}}
    )[1]
    prompt = estimate_prompt_tokens(RENDERED)
    assert native["meta_info"]["prompt_tokens"] == prompt
    assert list(response) == ["id", "object", "created", "model", "choices", "usage", "metadata"]
    assert (response["id"], response["object"], response["model"]) == (
        "chat-1",
        "chat.completion",
        "default",  # SGLang's DEFAULT_MODEL_NAME when the request names none
    )
    assert response["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": native["text"], "reasoning_content": None},
            "logprobs": None,
            "finish_reason": "length",
            "matched_stop": None,
        }
    ]
    usage = response["usage"]
    assert list(usage) == USAGE_KEYS
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        prompt,
        4,
        prompt + 4,
    )
    assert response["metadata"] == {"weight_version": "default"}
    # max_completion_tokens wins over max_tokens; any model name is answered and echoed
    again = ok(
        server,
        CHAT,
        {"messages": MESSAGES, "max_tokens": 9, "max_completion_tokens": 2, "model": "x/y"},
    )
    assert again["usage"]["completion_tokens"] == 2 and again["model"] == "x/y"


def test_completions_take_text_or_token_ids(server):
    response = ok(server, COMPLETIONS, {"prompt": QUESTION, "max_tokens": 3, "seed": 1})
    assert response["object"] == "text_completion"
    choice = response["choices"][0]
    assert list(choice) == ["index", "text", "logprobs", "finish_reason", "matched_stop"]
    assert choice["finish_reason"] == "length"
    assert response["usage"]["prompt_tokens"] == estimate_prompt_tokens(QUESTION)
    echoed = ok(server, COMPLETIONS, {"prompt": QUESTION, "max_tokens": 3, "echo": True})
    assert echoed["choices"][0]["text"] == QUESTION + choice["text"]
    ids = ok(server, COMPLETIONS, {"prompt": [5, 6, 7, 8, 9], "stop": ["\n"], "temperature": 0})
    assert ids["usage"]["prompt_tokens"] == 5
    assert ids["usage"]["completion_tokens"] == 16  # CompletionRequest's max_tokens default


def test_chat_streams_role_content_finish_then_usage_chunks(server):
    body = {"messages": MESSAGES, "max_tokens": 3, "stream": True}
    status, events, ctype = call(server, CHAT, body)
    assert status == 200 and ctype.startswith("text/event-stream")
    unary = ok(server, CHAT, {**body, "stream": False})
    assert len(events) == 1 + 3 + 1  # role, one per token, finish; no usage unasked
    ids = {e["id"] for e in events}
    assert len(ids) == 1 and {e["object"] for e in events} == {"chat.completion.chunk"}
    assert all(list(e) == ["id", "object", "created", "model", "choices"] for e in events)
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"reasoning_content": None, "role": "assistant", "content": ""}
    assert all(list(d) == ["reasoning_content", "content"] for d in deltas[1:4])
    assert "".join(d["content"] for d in deltas[1:4]) == unary["choices"][0]["message"]["content"]
    assert deltas[4] == {"reasoning_content": None}
    finishes = [e["choices"][0]["finish_reason"] for e in events]
    assert finishes == [None, None, None, None, "length"]

    options = {"include_usage": True, "continuous_usage_stats": True}
    _, events, _ = call(server, CHAT, {**body, "stream_options": options})
    prompt = estimate_prompt_tokens(RENDERED)
    assert [e["usage"]["completion_tokens"] for e in events[1:4]] == [1, 2, 3]
    assert "usage" not in events[0] and "usage" not in events[4]
    final = events[-1]
    assert final["choices"] == [] and list(final["usage"]) == USAGE_KEYS
    assert final["usage"]["total_tokens"] == prompt + 3


def test_completions_stream_one_chunk_per_token_then_usage(server):
    body = {"prompt": QUESTION, "max_tokens": 3, "stream": True}
    _, events, _ = call(server, COMPLETIONS, {**body, "stream_options": {"include_usage": True}})
    assert len(events) == 3 + 1
    for e in events[:3]:
        assert list(e) == ["id", "object", "created", "model", "choices", "usage"]
        assert e["object"] == "text_completion" and e["usage"] is None
    assert [e["choices"][0]["finish_reason"] for e in events[:3]] == [None, None, "length"]
    unary = ok(server, COMPLETIONS, {**body, "stream": False})
    assert "".join(e["choices"][0]["text"] for e in events[:3]) == unary["choices"][0]["text"]
    # the usage chunk is written with exclude_none: no model, no null details
    prompt = estimate_prompt_tokens(QUESTION)
    assert events[3] == {
        "id": events[0]["id"],
        "object": "text_completion",
        "created": events[0]["created"],
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "total_tokens": prompt + 3,
            "completion_tokens": 3,
            "reasoning_tokens": 0,
        },
    }


def test_routed_experts_come_in_sglext_unary_and_in_their_own_chunk(server):
    prompt = estimate_prompt_tokens(RENDERED)
    body = {"messages": MESSAGES, "max_tokens": 5, "return_routed_experts": True}
    unary = ok(server, CHAT, body)
    ids = decode_routed_experts(unary["sglext"]["routed_experts"], MODEL)
    assert ids.shape == (prompt + 5 - 1, MODEL.num_hidden_layers, MODEL.top_k)
    native = post(
        server.url + "/generate",
        {"text": RENDERED, "sampling_params": {"max_new_tokens": 5}, "return_routed_experts": True},
    )[1]
    assert unary["sglext"]["routed_experts"] == native["meta_info"]["routed_experts"]
    assert "sglext" not in ok(server, CHAT, {"messages": MESSAGES, "max_tokens": 5})

    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    _, events, _ = call(server, CHAT, stream)
    sglext = events[-2]  # after the finish chunk, before the usage chunk
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert sglext["choices"] == [] and sglext["usage"] is None
    assert sglext["sglext"] == unary["sglext"]
    assert "sglext" not in events[-1] and all("sglext" not in e for e in events[:-2])

    cut = ok(server, COMPLETIONS, {"prompt": QUESTION, **body, "routed_experts_start_len": 2})
    rows = decode_routed_experts(cut["sglext"]["routed_experts"], MODEL)
    prompt = estimate_prompt_tokens(QUESTION)
    assert rows.shape[0] == prompt + 5 - 1 - 2
    _, events, _ = call(server, COMPLETIONS, {"prompt": QUESTION, **body, "stream": True})
    assert events[-1]["choices"] == [] and events[-1]["object"] == "text_completion"
    full = decode_routed_experts(events[-1]["sglext"]["routed_experts"], MODEL)
    np.testing.assert_array_equal(full[2:], rows)


def test_return_meta_info_puts_generates_meta_info_in_the_choice(server):
    body = {"messages": [{"role": "user", "content": CODE_PROMPT}], "return_routed_experts": True}
    response = ok(server, CHAT, {**body, "return_meta_info": True, "max_tokens": 2})
    meta = response["choices"][0]["meta_info"]
    assert "routed_experts" in meta and "sglext" not in response
    # the class comes from the last user message, not from the rendered template
    assert meta["emulator"]["class_from"] == "corpus:code"
    status, error, _ = call(server, CHAT, {**body, "return_meta_info": True, "stream": True})
    assert status == 400 and error["type"] == "BadRequest"


@pytest.mark.parametrize(
    ("field", "headers", "logged"),
    [
        ("routed_dp_rank", {}, "routed_dp_rank"),
        ("data_parallel_rank", {}, "data_parallel_rank"),
        ("routed_dp_rank", {"X-Data-Parallel-Rank": "3"}, "X-Data-Parallel-Rank"),
    ],
)
def test_a_pinned_request_runs_on_its_rank(server, field, headers, logged):
    rank = 3 if headers else 2
    body = {"messages": MESSAGES, "max_tokens": 2, field: 1 if headers else 2}
    ok(server, CHAT, body, headers=headers)  # the header wins over the body
    row = last_request(server)
    assert (row["dp_rank"], row["pinned_field"], row["outcome"]) == (rank, logged, "ok")
    assert row["completion_tokens"] == 2
    ok(server, COMPLETIONS, {"prompt": QUESTION, "max_tokens": 2, field: 0}, headers=headers)
    assert last_request(server)["dp_rank"] == (3 if headers else 0)


@pytest.mark.parametrize(
    ("path", "body", "status", "err_type", "message"),
    [
        (CHAT, b"{not json", 400, "Bad Request", "json_invalid"),
        (CHAT, {"max_tokens": 2}, 400, "Bad Request", "'messages'"),
        (CHAT, {"messages": []}, 400, "BadRequestError", "Messages cannot be empty."),
        (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, "Bad Request", "role"),
        (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, 400, "Bad Request", "must be positive"),
        (COMPLETIONS, {"prompt": ""}, 400, "BadRequestError", "Prompt cannot be empty"),
        (COMPLETIONS, {"prompt": "x", "routed_dp_rank": 4}, 400, "BadRequestError", "[0, 4)"),
        (COMPLETIONS, {"prompt": "x", "n": 2}, 400, "BadRequestError", "n=2"),
        (COMPLETIONS, {"prompt": "x", "model": "base:lora1"}, 400, "BadRequestError", "LoRA"),
        (
            CHAT,
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}], "stream": True},
            400,
            "BadRequestError",
            "Model only supports text input",
        ),
    ],
)
def test_errors_are_sglangs_error_response(server, path, body, status, err_type, message):
    got, error, ctype = call(server, path, body)
    assert (got, ctype) == (status, "application/json")
    assert list(error) == ["object", "message", "type", "param", "code"]
    assert (error["object"], error["type"], error["param"], error["code"]) == (
        "error",
        err_type,
        None,
        status,
    )
    assert message in error["message"]


def test_a_bad_rank_header_or_content_type_is_refused(server):
    status, error, _ = call(
        server, CHAT, {"messages": MESSAGES}, headers={"X-Data-Parallel-Rank": "two"}
    )
    assert (status, error["type"]) == (400, "400")
    assert error["message"] == "Invalid X-Data-Parallel-Rank header: must be an integer, got 'two'"
    status, error, _ = call(
        server, CHAT, json.dumps({"messages": MESSAGES}).encode(), {"Content-Type": "text/plain"}
    )
    assert (status, error["type"]) == (400, "Bad Request") and "application/json" in str(error)


@pytest.mark.parametrize(
    ("version", "pinned", "routed"),
    [
        ("0.5.6", None, False),  # no rank field, no routed experts on the OpenAI layer
        ("0.5.8", "data_parallel_rank", False),  # the pin; routed experts arrive in 0.5.9
        ("0.5.9", "data_parallel_rank", True),  # sglext; routed_dp_rank and the header: 0.5.20
    ],
)
def test_old_versions_drop_the_fields_they_do_not_know(version, pinned, routed):
    with EmulatorServer(make_emulator(sglang_version=version)) as old:
        body = {
            "messages": MESSAGES,
            "max_tokens": 2,
            "data_parallel_rank": 3,
            "return_routed_experts": True,
        }
        response = ok(old, CHAT, body)
        assert ("sglext" in response) == routed
        row = last_request(old)
        assert row["pinned_field"] == pinned and (row["dp_rank"] == 3) == (pinned is not None)
        # routed_dp_rank and X-Data-Parallel-Rank are unknown before 0.5.20
        ok(
            old,
            CHAT,
            {"messages": MESSAGES, "routed_dp_rank": 1},
            headers={"X-Data-Parallel-Rank": "x"},
        )
        assert last_request(old)["pinned_field"] is None


@pytest.fixture(scope="module")
def pd():
    with (
        EmulatorServer(make_emulator(role="prefill")) as prefill,
        EmulatorServer(make_emulator(role="decode", kv_timeout_s=5.0)) as decode,
    ):
        yield prefill, decode


def _pair(pd, path: str, prefill_body: dict[str, Any], decode_body: dict[str, Any]):
    """Both legs at once, as sgl-router sends them."""

    async def post_one(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
        async with session.post(url + path, json=body) as response:
            return response.status, await response.text()

    async def go() -> Any:
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(
                post_one(session, pd[0].url, prefill_body),
                post_one(session, pd[1].url, decode_body),
            )

    return asyncio.run(go())


def test_a_pd_pair_over_chat_completions(pd):
    prefill, decode = pd
    assert prefill.bootstrap is not None
    room = random.getrandbits(63)
    room -= room % 4 - 1  # follow_bootstrap_room sends it to rank 1
    common = {
        "messages": MESSAGES,
        "max_tokens": 4,
        "bootstrap_host": prefill.bootstrap[0],
        "bootstrap_port": prefill.bootstrap[1],
        "bootstrap_room": room,
        "return_routed_experts": True,
    }
    (p_status, p_text), (d_status, d_text) = _pair(
        pd, CHAT, {**common, "routed_dp_rank": 1}, {**common, "disagg_prefill_dp_rank": 1}
    )
    assert (p_status, d_status) == (200, 200), (p_text, d_text)
    p, d = json.loads(p_text), json.loads(d_text)
    prompt = estimate_prompt_tokens(RENDERED)
    assert p["usage"]["completion_tokens"] == 1 and d["usage"]["completion_tokens"] == 4
    assert d["usage"]["prompt_tokens"] == prompt
    rows = decode_routed_experts(d["sglext"]["routed_experts"], MODEL)
    assert rows.shape == (prompt + 4 - 1, MODEL.num_hidden_layers, MODEL.top_k)
    p_row, d_row = last_request(prefill), last_request(decode)
    assert (p_row["bootstrap_room"], p_row["dp_rank"], p_row["outcome"]) == (room, 1, "ok")
    assert (d_row["bootstrap_room"], d_row["disagg_prefill_dp_rank"]) == (room, 1)
    assert get(decode.url + "/admin/requests")[1]["disagg_prefill_dp_rank_honoured"] != [0] * 4


def test_a_streamed_kv_failure_is_an_error_event_then_usage(pd):
    _, decode = pd
    body = {
        "prompt": QUESTION,
        "stream": True,
        "stream_options": {"include_usage": True},
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": 9,  # nothing listens: the KV never comes
        "bootstrap_room": 7,
    }
    status, events, _ = call(decode, COMPLETIONS, body)
    assert status == 200 and len(events) == 2
    error = events[0]["error"]
    assert (error["object"], error["type"], error["code"]) == (
        "error",
        "INTERNAL_SERVER_ERROR",
        500,
    )
    assert "Decode transfer failed" in error["message"]
    assert events[1]["choices"] == [] and events[1]["usage"]["completion_tokens"] == 0
    assert last_request(decode)["outcome"] == "error"


@pytest.mark.skipif(importlib.util.find_spec("openai") is None, reason="needs the openai package")
def test_the_official_openai_client_talks_to_it(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    text = reply.choices[0].message.content
    stream = client.chat.completions.create(
        model="m",
        messages=MESSAGES,
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.total_tokens == reply.usage.total_tokens
    )
    completion = client.completions.create(model="m", prompt=QUESTION, max_tokens=2)
    assert completion.choices[0].finish_reason == "length"
