"""PD disaggregation: a prefill and a decode emulator on loopback, driven with aiohttp
as sgl-router drives them (both legs sent at once, a random bootstrap room)."""

from __future__ import annotations

import asyncio
import json
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import numpy as np
import pytest

from scheduler.emulator.core import estimate_prompt_tokens
from scheduler.traces.importers.sglang_generate import decode_routed_experts
from tests.emulator_harness import (
    MODEL,
    EmulatorServer,
    connection_fate,
    get,
    make_emulator,
    post,
    wait_for_fate,
    wait_for_load,
)

PROMPT = "Translate the following sentence into French, please."
RANKS = 4  # 2 nodes x 2 GPUs


@pytest.fixture(scope="module")
def pd():
    with (
        EmulatorServer(make_emulator(role="prefill")) as prefill,
        EmulatorServer(make_emulator(role="decode")) as decode,
    ):
        yield prefill, decode


def _room(rank: int | None = None) -> int:
    """A random room as sgl-router draws it (``u64 & i64::MAX``), optionally one that
    follow_bootstrap_room sends to ``rank``."""
    room = random.getrandbits(63)
    return room if rank is None else room - room % RANKS + rank


def _bodies(
    prefill: EmulatorServer, room: int, max_new_tokens: int = 5, **common: Any
) -> dict[str, Any]:
    assert prefill.bootstrap is not None
    host, port = prefill.bootstrap
    return {
        "text": PROMPT,
        "sampling_params": {"max_new_tokens": max_new_tokens},
        "bootstrap_host": host,
        "bootstrap_port": port,
        "bootstrap_room": room,
        **common,
    }


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with session.post(url + "/generate", json=body) as response:
        if body.get("stream"):
            text = await response.text()
            events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
            return response.status, events
        return response.status, await response.json(content_type=None)


def pair(
    pd: tuple[EmulatorServer, EmulatorServer],
    prefill_body: dict[str, Any],
    decode_body: dict[str, Any],
) -> tuple[Any, Any]:
    """Both legs at once, as sgl-router's ``execute_dual_dispatch`` sends them."""
    prefill, decode = pd

    async def go() -> tuple[Any, Any]:
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(
                _post(session, prefill.url, prefill_body), _post(session, decode.url, decode_body)
            )

    return asyncio.run(go())


def _record(server: EmulatorServer, room: int) -> dict[str, Any]:
    rows = [r for r in get(server.url + "/admin/requests")[1]["requests"]]
    (row,) = [r for r in rows if r["bootstrap_room"] == room]
    return row


def test_a_pd_pair_answers_both_legs_as_sglang_does(pd):
    prefill, decode = pd
    room = _room(rank=1)  # follow_bootstrap_room agrees with the pinned rank
    body = _bodies(prefill, room, return_routed_experts=True)
    (p_status, p), (d_status, d) = pair(
        pd,
        {**body, "routed_dp_rank": 1},
        {**body, "routed_dp_rank": 2, "disagg_prefill_dp_rank": 1},
    )
    assert (p_status, d_status) == (200, 200), (p, d)
    prompt = estimate_prompt_tokens(PROMPT)
    # prefill: SGLang's prefill answer, one token and FINISH_LENGTH(length=0)
    pm = p["meta_info"]
    assert len(p["output_ids"]) == 1 and pm["completion_tokens"] == 1
    assert pm["finish_reason"] == {"type": "length", "length": 0}
    assert (pm["prompt_tokens"], pm["dp_rank"]) == (prompt, 1)
    p_rows = decode_routed_experts(pm["routed_experts"], MODEL)
    assert p_rows.shape == (prompt, MODEL.num_hidden_layers, MODEL.top_k)  # prompt rows only
    # decode: the completion, as a mixed instance answers it
    dm = d["meta_info"]
    assert len(d["output_ids"]) == 5 and dm["completion_tokens"] == 5
    assert dm["finish_reason"] == {"type": "length", "length": 5}
    assert dm["dp_rank"] == 2 and dm["emulator"]["modelled_prefill_s"] == 0.0
    assert d["output_ids"][0] == p["output_ids"][0]  # the prefill's token comes first
    d_rows = decode_routed_experts(dm["routed_experts"], MODEL)
    assert d_rows.shape == (prompt + 5 - 1, MODEL.num_hidden_layers, MODEL.top_k)
    np.testing.assert_array_equal(d_rows[:prompt], p_rows)  # one routing for the request
    # what each instance recorded of its leg
    host, port = prefill.bootstrap or ("", 0)
    common = {"bootstrap_room": room, "bootstrap_host": host, "bootstrap_port": port}
    p_row, d_row = _record(prefill, room), _record(decode, room)
    assert p_row == {
        "rid": pm["id"],
        "role": "prefill",
        "dp_rank": 1,
        "pinned_field": "routed_dp_rank",
        "disagg_prefill_dp_rank": None,
        "outcome": "ok",
        "completion_tokens": 1,
        "error": None,
        **common,
    }
    assert d_row == {
        "rid": dm["id"],
        "role": "decode",
        "dp_rank": 2,
        "pinned_field": "routed_dp_rank",
        "disagg_prefill_dp_rank": 1,
        "outcome": "ok",
        "completion_tokens": 5,
        "error": None,
        **common,
    }
    served = get(decode.url + "/admin/requests")[1]
    assert served["served"][2] >= 1 and served["disagg_prefill_dp_rank_honoured"][2] >= 1


def test_unpinned_legs_follow_the_room_on_prefill_and_round_robin_on_decode(pd):
    prefill, decode = pd
    for _ in range(3):
        room = _room()
        (p_status, p), (d_status, d) = pair(pd, _bodies(prefill, room), _bodies(prefill, room))
        assert (p_status, d_status) == (200, 200)
        assert p["meta_info"]["dp_rank"] == room % RANKS  # SGLang's follow_bootstrap_room
        assert _record(prefill, room)["pinned_field"] is None
    info = get(prefill.url + "/server_info")[1]
    assert info["load_balance_method"] == "follow_bootstrap_room"
    assert info["disaggregation_mode"] == "prefill"
    assert info["disaggregation_bootstrap_port"] == (prefill.bootstrap or ("", 0))[1]
    assert get(decode.url + "/server_info")[1]["disaggregation_mode"] == "decode"
    assert get(decode.url + "/model_info")[1]["disaggregation_mode"] == "decode"


def test_a_wrong_disagg_prefill_dp_rank_fails_both_legs_as_a_kv_transfer_failure(pd):
    prefill, decode = pd
    room = _room(rank=3)
    body = _bodies(prefill, room)
    (p_status, p), (d_status, d) = pair(
        pd, {**body, "routed_dp_rank": 3}, {**body, "disagg_prefill_dp_rank": 0}
    )
    # SGLang aborts KV transfer failures with 500 and its ErrorResponse body
    assert (p_status, d_status) == (500, 500)
    assert d["object"] == "error" and d["code"] == 500 and d["type"] == "500"
    assert d["message"].startswith("Decode transfer failed for request rank=")
    assert "KVTransferError(bootstrap_room=" in d["message"]
    assert "prefill DP rank 3" in d["message"]
    assert p["message"].startswith("Prefill bootstrap failed for request rank=3")
    d_row = _record(decode, room)
    assert (d_row["outcome"], d_row["completion_tokens"]) == ("error", 0)
    assert d_row["error"] == d["message"] and d_row["disagg_prefill_dp_rank"] == 0
    assert _record(prefill, room)["outcome"] == "error"


def test_a_prefill_pinned_off_its_room_fails_unless_it_names_its_rank(pd):
    prefill, decode = pd
    room = _room(rank=0)
    body = _bodies(prefill, room)
    # pinned to rank 2 but room % 4 == 0: SGLang's KV sender refuses (follow_bootstrap_room)
    (p_status, p), (d_status, d) = pair(pd, {**body, "routed_dp_rank": 2}, body)
    assert (p_status, d_status) == (500, 500)
    assert "follow_bootstrap_room conflict: dispatched to dp_rank 2" in p["message"]
    assert "follow_bootstrap_room conflict" in d["message"]
    # with disagg_prefill_dp_rank on the prefill leg too, the rank is known: it works
    room = _room(rank=0)
    body = _bodies(prefill, room)
    hinted = {**body, "disagg_prefill_dp_rank": 2}
    (p_status, p), (d_status, d) = pair(pd, {**hinted, "routed_dp_rank": 2}, hinted)
    assert (p_status, d_status) == (200, 200)
    assert p["meta_info"]["dp_rank"] == 2


def test_both_legs_stream(pd):
    prefill, decode = pd
    room = _room(rank=1)
    body = _bodies(prefill, room, max_new_tokens=4, stream=True, return_routed_experts=True)
    (p_status, p_events), (d_status, d_events) = pair(
        pd, {**body, "routed_dp_rank": 1}, {**body, "disagg_prefill_dp_rank": 1}
    )
    assert (p_status, d_status) == (200, 200)
    assert p_events[-1] == d_events[-1] == "[DONE]"
    (p_chunk,) = [json.loads(e) for e in p_events[:-1]]  # one chunk, then [DONE]
    assert p_chunk["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    assert "routed_experts" in p_chunk["meta_info"] and len(p_chunk["output_ids"]) == 1
    d_chunks = [json.loads(e) for e in d_events[:-1]]
    assert [c["meta_info"]["completion_tokens"] for c in d_chunks] == [1, 2, 3, 4]
    assert d_chunks[-1]["output_ids"][0] == p_chunk["output_ids"][0]
    assert "routed_experts" in d_chunks[-1]["meta_info"]


def test_a_streamed_kv_failure_is_an_abort_chunk(pd):
    prefill, decode = pd
    room = _room(rank=1)
    body = _bodies(prefill, room, stream=True)
    (_, p_events), (d_status, d_events) = pair(
        pd, {**body, "routed_dp_rank": 1}, {**body, "disagg_prefill_dp_rank": 2}
    )
    assert d_status == 200 and d_events[-1] == "[DONE]"
    (chunk,) = [json.loads(e) for e in d_events[:-1]]
    reason = chunk["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and reason["status_code"] == 500
    assert reason["message"].startswith("Decode transfer failed")
    assert json.loads(p_events[0])["meta_info"]["finish_reason"]["type"] == "abort"


@pytest.mark.parametrize(
    "role, drop, message",
    [
        ("prefill", "bootstrap_room", "without bootstrap room id"),
        ("decode", "bootstrap_room", "without bootstrap room id"),
        ("decode", "bootstrap_host", "bootstrap_host and bootstrap_port"),
        ("decode", "bootstrap_port", "bootstrap_host and bootstrap_port"),
    ],
)
def test_pd_requests_without_their_bootstrap_fields_are_400(pd, role, drop, message):
    prefill, decode = pd
    server = prefill if role == "prefill" else decode
    body = {**_bodies(prefill, _room()), "routed_dp_rank": 0}
    del body[drop]
    status, response = post(server.url + "/generate", body)
    assert status == 400 and message in response["error"]["message"], response


def test_a_mixed_instance_ignores_the_bootstrap_fields(pd):
    prefill, _ = pd
    with EmulatorServer(make_emulator()) as mixed:
        status, response = post(mixed.url + "/generate", _bodies(prefill, _room()))
        assert status == 200 and response["meta_info"]["completion_tokens"] == 5
        assert get(mixed.url + "/server_info")[1]["disaggregation_mode"] == "null"


def test_legs_without_a_peer_time_out_and_show_in_the_loads():
    with (
        EmulatorServer(make_emulator(role="prefill", kv_timeout_s=0.5)) as prefill,
        EmulatorServer(make_emulator(role="decode", kv_timeout_s=30)) as decode,
    ):
        # a decode leg whose prefill never comes waits for its KV (SGLang's prealloc queue)
        body = {**_bodies(prefill, _room()), "routed_dp_rank": 1}
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(post, decode.url + "/generate", body)
            row = wait_for_load(decode.url, 1, num_waiting_reqs=1)
            assert row["num_active_tokens"] == 0 and row["num_total_tokens"] > 0
            assert row["disaggregation"]["decode_prealloc_queue_reqs"] == 1
            # the prefill leg arrives late and finds its peer: both finish
            status, p = post(prefill.url + "/generate", {**body, "routed_dp_rank": None})
            assert status == 200 and waiting.result()[0] == 200
        # a prefill leg whose decode never comes gives up after --kv-timeout
        status, p = post(prefill.url + "/generate", _bodies(prefill, _room()))
        assert status == 500 and "timed out after 0.5s" in p["message"]
        # a decode leg whose bootstrap server is gone: a lost connection, 500
        dead = {**_bodies(prefill, _room()), "bootstrap_port": _closed_port()}
        status, d = post(decode.url + "/generate", dead)
        assert status == 500 and "Lost connection with prefill instance" in d["message"]


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:  # bound, never listening: connecting is refused
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unpinned_prefill_without_a_room_takes_the_instance_down():
    # follow_bootstrap_room asserts on a missing room inside SGLang's DP controller
    with EmulatorServer(make_emulator(role="prefill")) as prefill:
        assert connection_fate(prefill.url + "/generate", {"text": "no room"}) == "reset"
        wait_for_fate(prefill.url + "/health", "refused")
        assert prefill.bootstrap is not None
        assert connection_fate("http://{}:{}/health".format(*prefill.bootstrap)) == "refused"


def test_the_bootstrap_server_pairs_and_checks():
    with EmulatorServer(make_emulator(role="prefill", kv_timeout_s=0.5)) as prefill:
        assert prefill.bootstrap is not None
        boot = "http://{}:{}".format(*prefill.bootstrap)
        assert get(boot + "/health") == (200, "OK")
        status, body = get(boot + "/kv/12345?timeout_s=0")
        assert status == 408 and "no prefill finished" in body["error"]["message"]
        assert get(boot + "/kv/abc")[0] == 400
        room = _room(rank=2)
        with ThreadPoolExecutor(1) as pool:
            leg = pool.submit(post, prefill.url + "/generate", _bodies(prefill, room))
            status, body = get(f"{boot}/kv/{room}?timeout_s=30")
            assert (status, body) == (
                200,
                {
                    "bootstrap_room": room,
                    "prefill_dp_rank": 2,
                    "prompt_tokens": estimate_prompt_tokens(PROMPT),
                },
            )
            assert leg.result()[0] == 200  # the fetch released the prefill leg


def test_before_0_5_20_a_decode_expects_its_kv_on_its_own_data_parallel_rank():
    # 0.5.9 drops disagg_prefill_dp_rank and takes the decode's data_parallel_rank as the
    # prefill rank: legs pinned to different ranks never pair (both fail here, at once)
    old = {"sglang_version": "0.5.9"}
    with (
        EmulatorServer(make_emulator(role="prefill", **old)) as prefill,
        EmulatorServer(make_emulator(role="decode", **old)) as decode,
    ):
        legs = (prefill, decode)
        body = _bodies(prefill, _room(rank=1))
        (p_status, _), (d_status, d) = pair(
            legs,
            {**body, "data_parallel_rank": 1},
            {**body, "data_parallel_rank": 2, "disagg_prefill_dp_rank": 1},
        )
        assert (p_status, d_status) == (500, 500)
        assert "not on prefill DP rank 2" in d["message"]
        assert _record(decode, body["bootstrap_room"])["disagg_prefill_dp_rank"] is None
        body = _bodies(prefill, _room(rank=1))
        (p_status, _), (d_status, _) = pair(
            legs, {**body, "data_parallel_rank": 1}, {**body, "data_parallel_rank": 1}
        )
        assert (p_status, d_status) == (200, 200)
