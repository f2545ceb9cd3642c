"""OpenAI-shaped requests as scheduler jobs, OpenAI-shaped errors, and the reading of an
OpenAI stream (pure: no network)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from scheduler.errors import ConfigError, RequestError
from scheduler.server.backend import CHAT, COMPLETIONS, GENERATE, ROUTING_KEY_HEADER, _encode
from scheduler.server.cluster import load_cluster
from scheduler.server.config import load_config
from scheduler.server.core import estimate_tokens
from scheduler.server.openai_requests import ModelNotFound, error_body, parse
from scheduler.server.wire import OpenAIEvents
from tests.emulator_harness import MODEL
from tests.server_harness import write_config

MODELS = [MODEL.name]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("openai")
    config = load_config(write_config(tmp, "http://127.0.0.1:9"))
    return config, load_cluster(config)


def _parse(setup: Any, endpoint: str, body: Any, request_id: str = "") -> Any:
    config, cluster = setup
    return parse(endpoint, body, config, cluster, MODELS, request_id)


def test_a_chat_is_predicted_from_its_last_user_turn_and_forwarded_as_sent(setup: Any) -> None:
    body = {
        "model": MODEL.name,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": [{"type": "text", "text": "solve 2x + 3 = 7"}]},
        ],
        "max_tokens": 16,
        "temperature": 0.5,
        "stop": "\n\n",
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "routed_dp_rank": 3,  # the scheduler chooses the rank: dropped
        "return_routed_experts": True,
        "class_hint": "law",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    got = _parse(setup, CHAT, body, "r1")
    job = got.job
    assert got.stream and job.endpoint == CHAT and job.request_id == "r1"
    assert job.text == "solve 2x + 3 = 7"
    assert job.class_hint == "law"
    assert job.sampling == {"max_new_tokens": 16, "temperature": 0.5, "stop": ["\n\n"]}
    every = "You are a helpful assistant.\nhello\nhi\nsolve 2x + 3 = 7"
    assert job.prompt_tokens == estimate_tokens(every) + 4 * 4
    forwarded = job.openai
    assert forwarded["tools"] == body["tools"] and forwarded["stream_options"]
    for key in ("routed_dp_rank", "return_routed_experts", "class_hint", "stream"):
        assert key not in forwarded


def test_a_completion_takes_a_string_token_ids_or_a_batch_of_one(setup: Any) -> None:
    text = _parse(setup, COMPLETIONS, {"model": MODEL.name, "prompt": "def f():"}).job
    assert (text.text, text.input_ids, text.endpoint) == ("def f():", None, COMPLETIONS)
    ids = _parse(setup, COMPLETIONS, {"model": MODEL.name, "prompt": [[1, 2, 3]]}).job
    assert (ids.text, ids.input_ids, ids.prompt_tokens) == (None, [1, 2, 3], 3)
    unary = _parse(setup, COMPLETIONS, {"model": MODEL.name, "prompt": "x", "stream_options": {}})
    assert not unary.stream and "stream_options" not in unary.job.openai


@pytest.mark.parametrize(
    ("endpoint", "body", "says"),
    [
        (CHAT, [], "JSON object"),
        (CHAT, {"messages": [{"role": "user", "content": "x"}]}, "model is required"),
        (CHAT, {"model": MODEL.name}, "messages must be a non-empty list"),
        (CHAT, {"model": MODEL.name, "messages": [{"role": "robot", "content": "x"}]}, "role"),
        (CHAT, {"model": MODEL.name, "messages": [{"role": "user", "content": 3}]}, "content"),
        (CHAT, {"model": MODEL.name, "messages": [{"role": "user", "content": " "}]}, "empty"),
        (COMPLETIONS, {"model": MODEL.name, "prompt": ["a", "b"]}, "one request per prompt"),
        (COMPLETIONS, {"model": MODEL.name, "prompt": 7}, "prompt must be"),
        (COMPLETIONS, {"model": MODEL.name, "prompt": "x", "n": 2}, "n must be 1"),
        (COMPLETIONS, {"model": MODEL.name, "prompt": "x", "max_tokens": "9"}, "a number"),
        (COMPLETIONS, {"model": MODEL.name, "prompt": "x", "max_tokens": 0}, "max_new_tokens"),
        (COMPLETIONS, {"model": MODEL.name, "prompt": "x", "stream": "yes"}, "stream must"),
        (COMPLETIONS, {"model": MODEL.name, "prompt": "x", "stop": [1]}, "stop must"),
        (COMPLETIONS, {"model": MODEL.name, "prompt": "x", "class_hint": "nope"}, "class_hint"),
    ],
)
def test_bad_requests_are_invalid_with_a_reason(
    setup: Any, endpoint: str, body: Any, says: str
) -> None:
    with pytest.raises(RequestError, match=says) as caught:
        _parse(setup, endpoint, body)
    assert caught.value.outcome == "invalid"
    status, error = error_body(caught.value)
    assert status == 400 and error["error"]["type"] == "invalid_request_error"


def test_an_unknown_model_is_404_model_not_found(setup: Any) -> None:
    with pytest.raises(ModelNotFound) as caught:
        _parse(setup, CHAT, {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]})
    status, error = error_body(caught.value)
    assert status == 404 and error["error"]["code"] == "model_not_found"
    assert MODEL.name in error["error"]["message"]


def test_outcomes_have_openai_statuses() -> None:
    assert error_body("overloaded", "busy")[0] == 429
    assert error_body("backend_error", "down")[0] == 502
    assert error_body("client_deadline", "late")[0] == 504
    assert error_body("unauthorized", "key")[1]["error"]["code"] == "invalid_api_key"


def _event(value: dict[str, Any]) -> bytes:
    return orjson.dumps(value)


def test_an_openai_stream_relays_chunks_and_keeps_usage_and_routed_experts() -> None:
    first = _event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    text = _event({"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]})
    done = _event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    routed = b'{"choices":[],"usage":null,"sglext":{"routed_experts":"AAAA"}}'
    usage = _event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
    for keep in (False, True):
        events = OpenAIEvents(keep_usage=keep)
        got = [events.feed(raw) for raw in (first, text, done, routed, usage)]
        assert [t for t, _ in got] == ["", "Hi", "", "", ""]
        assert [raw for _, raw in got[:3]] == [first, text, done]
        assert got[3][1] is None  # the routed experts' own chunk: the scheduler's
        assert (got[4][1] is not None) == keep  # the usage chunk only when the client asked
        assert events.routed == b"AAAA"
        assert events.meta == {
            "prompt_tokens": 5,
            "completion_tokens": 2,
            "finish_reason": {"type": "stop"},
        }


def test_openai_listen_must_be_host_port(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="server.openai_listen must be HOST:PORT"):
        load_config(write_config(tmp_path, "http://127.0.0.1:9", server={"openai_listen": "8000"}))


def test_the_routing_key_goes_in_the_body_or_the_openai_header() -> None:
    payload = {"rid": "r", "routing_key": "law", "messages": []}
    body, headers = _encode(GENERATE, payload)
    assert orjson.loads(body) == payload and headers is None
    body, headers = _encode(CHAT, payload)
    assert orjson.loads(body) == {"rid": "r", "messages": []}
    assert headers == {ROUTING_KEY_HEADER: "law"}
