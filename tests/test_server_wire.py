"""Reading SGLang's responses at wire speed (scheduler/server/wire.py): the routed
experts cut out as bytes, SSE events of any size, new text and ids per streamed chunk."""

from __future__ import annotations

import json

import orjson
import pytest

from scheduler.server.wire import SSEEvents, StreamDelta, WireError, split_routed


def test_split_routed_cuts_the_value_out_in_both_json_styles() -> None:
    meta = {"prompt_tokens": 3, "routed_experts": "QUJD+/==", "completion_tokens": 2}
    for raw in (
        orjson.dumps({"text": 'say "routed_experts": x', "meta_info": meta}),
        json.dumps({"text": 'say "routed_experts": x', "meta_info": meta}).encode(),
    ):
        rest, routed = split_routed(raw)
        assert routed == b"QUJD+/=="
        data = json.loads(rest)
        assert data["meta_info"]["routed_experts"] is None
        assert data["meta_info"]["completion_tokens"] == 2
        assert data["text"] == 'say "routed_experts": x'


def test_split_routed_without_routed_experts() -> None:
    for body in ({"text": "a"}, {"meta_info": {"routed_experts": None}}):
        raw = orjson.dumps(body)
        assert split_routed(raw) == (raw, None)


def test_sse_events_have_no_line_limit_but_a_bound() -> None:
    big = b"x" * (3 << 20)
    events = SSEEvents(max_event_bytes=4 << 20)
    got: list[bytes] = []
    payload = b"data: " + big + b"\n\ndata: [DONE]\n\n"
    for i in range(0, len(payload), 65536):  # as the body arrives
        got += events.feed(payload[i : i + 65536])
    assert got == [big, b"[DONE]"]
    small = SSEEvents(max_event_bytes=1000)
    with pytest.raises(WireError, match="1000 bytes"):
        small.feed(b"data: " + b"y" * 2000)


def _chunk(text: str, ids: list[int], done: int, style: str) -> bytes:
    body = {"text": text, "output_ids": ids, "meta_info": {"completion_tokens": done}}
    return orjson.dumps(body) if style == "orjson" else json.dumps(body).encode()


@pytest.mark.parametrize("style", ["orjson", "json"])
def test_stream_delta_cumulative_and_incremental(style: str) -> None:
    tokens = ['He said "hi"', " \\o/", " caf\u00e9 \U0001f600", " ok", " ok"]
    ids = [11, 7, 123456, 5, 5]
    cumulative, incremental = StreamDelta(), StreamDelta()
    for n in range(1, len(tokens) + 1):
        raw = _chunk("".join(tokens[:n]), ids[:n], n, style)
        assert cumulative.feed(raw) == (tokens[n - 1], [ids[n - 1]])
        raw = _chunk(tokens[n - 1], [ids[n - 1]], n, style)
        assert incremental.feed(raw) == (tokens[n - 1], [ids[n - 1]])
    # decoded only what was new: far less than the cumulative bytes
    total = sum(len(_chunk("".join(tokens[:n]), ids[:n], n, style)) for n in range(1, 6))
    assert cumulative.parsed_bytes < total / 3


def test_stream_delta_falls_back_when_the_text_changes() -> None:
    d = StreamDelta()
    assert d.feed(_chunk("ab", [1, 2], 2, "orjson")) == ("ab", [1, 2])
    # the detokenizer rewrote the tail: relay what extends the characters already sent
    assert d.feed(_chunk("aX c", [1, 2, 3], 3, "orjson")) == (" c", [3])
    assert d.feed(_chunk("aX cd", [1, 2, 3, 4], 4, "orjson")) == ("d", [4])


def test_stream_delta_id_that_grew_digits_is_not_a_prefix() -> None:
    d = StreamDelta()
    assert d.feed(_chunk("a", [1], 1, "orjson")) == ("a", [1])
    # "[1" is a byte prefix of "[12" but 12 is another token: must not read as [1, 2]
    assert d.feed(_chunk("ab", [12, 3], 2, "orjson")) == ("b", [3])
