"""Fidelity with SGLang 0.5.23's own handlers (docs/sources.md, SGLang "Side endpoints")
and with the request fields of older SGLang versions, over real HTTP."""

from __future__ import annotations

import http.client
import json

import pytest

from tests.emulator_harness import EmulatorServer, get, make_emulator, post


@pytest.fixture(scope="module")
def server():
    with EmulatorServer(make_emulator()) as s:
        yield s


def _pinned(server: EmulatorServer) -> list[tuple[int, str | None]]:
    rows = get(server.url + "/admin/requests")[1]["requests"]
    return [(r["dp_rank"], r["pinned_field"]) for r in rows]


def test_model_info_has_the_fields_of_sglangs_handler(server):
    for path in ("/model_info", "/get_model_info"):  # the second is SGLang's deprecated alias
        status, info = get(server.url + path)
        assert status == 200
        assert set(info) == {
            "model_path",
            "served_model_name",
            "tokenizer_path",
            "is_generation",
            "preferred_sampling_params",
            "weight_version",
            "load_format",
            "reasoning_parser",
            "tool_call_parser",
            "disaggregation_mode",
            "has_image_understanding",
            "has_audio_understanding",
            "model_type",
            "architectures",
        }
        assert info["model_path"] == info["served_model_name"] == "deepseek-v2-lite"
        assert info["is_generation"] is True and info["disaggregation_mode"] == "null"
        assert info["architectures"] == ["DeepseekV2ForCausalLM"]
        assert info["tokenizer_path"] == "deepseek-v2-lite"  # SGLang's default: the model
    with EmulatorServer(make_emulator(tokenizer_path="/tmp/tok")) as other:
        assert get(other.url + "/model_info")[1]["tokenizer_path"] == "/tmp/tok"


def test_v1_models_is_an_openai_model_list(server):
    status, models = get(server.url + "/v1/models")
    assert status == 200 and models["object"] == "list"
    (card,) = models["data"]
    assert (card["id"], card["object"], card["owned_by"], card["root"]) == (
        "deepseek-v2-lite",
        "model",
        "sglang",
        "deepseek-v2-lite",
    )
    assert isinstance(card["created"], int)
    assert get(server.url + "/v1/models/deepseek-v2-lite")[1]["id"] == "deepseek-v2-lite"
    status, missing = get(server.url + "/v1/models/other")
    assert status == 404 and missing["error"]["code"] == "model_not_found"


def test_ready_is_200_while_serving_and_503_while_closing(server):
    assert get(server.url + "/ready")[0] == 200
    server.emulator.closing = True  # what a SIGTERM sets first
    try:
        assert get(server.url + "/ready")[0] == 503
    finally:
        server.emulator.closing = False


def test_generate_accepts_put_as_post(server):
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        body = json.dumps({"text": "hi", "sampling_params": {"max_new_tokens": 2}})
        connection.request("PUT", "/generate", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["meta_info"]["completion_tokens"] == 2
    finally:
        connection.close()


def test_v1_loads_rows_have_sglangs_fields(server):
    post(server.url + "/generate", {"text": "load me", "routed_dp_rank": 0})
    status, body = get(server.url + "/v1/loads?dp_rank=99")
    assert status == 200 and body["loads"] == []
    row = get(server.url + "/v1/loads?dp_rank=0")[1]["loads"][0]
    for key in (
        "num_waiting_uncached_tokens",
        "num_active_tokens",
        "num_prealloc_ready_tokens",
        "total_prefill_uncached_tokens",
        "total_prefill_busy_us",
        "decode_moments",
    ):
        assert key in row, key
    assert row["queues"]["prealloc_ready"] == 0
    assert row["disaggregation"]["mode"] == "null"
    assert row["total_prefill_uncached_tokens"] > 0
    moments = row["decode_moments"]  # [steps, sum b, sum t_us, sum b^2, sum b t, sum gen]
    assert len(moments) == 6 and moments[0] > 0 and moments[5] > 0


def test_the_version_is_reported_as_given_and_pins_use_the_new_field(server):
    info = get(server.url + "/server_info")[1]
    assert info["version"] == "0.5.23"  # exactly, so SglangVersion.parse reads it
    assert (info["attn_dp_size"], info["dp_size"]) == (4, 1)
    assert get(server.url + "/v1/loads")[1]["version"] == "0.5.23"
    post(server.url + "/generate", {"text": "a", "routed_dp_rank": 3})
    post(server.url + "/generate", {"text": "b", "data_parallel_rank": 2})  # deprecated alias
    assert _pinned(server)[-2:] == [(3, "routed_dp_rank"), (2, "data_parallel_rank")]


def test_an_old_version_drops_routed_dp_rank_and_balances_the_request():
    with EmulatorServer(make_emulator(sglang_version="0.5.9")) as old:
        info = get(old.url + "/server_info")[1]
        assert info["version"] == "0.5.9"
        assert info["dp_size"] == 4 and "attn_dp_size" not in info  # --dp-size N back then
        ranks = [
            post(old.url + "/generate", {"text": "x", "routed_dp_rank": 3})[1]["meta_info"][
                "dp_rank"
            ]
            for _ in range(4)
        ]
        assert sorted(ranks) == [0, 1, 2, 3]  # dropped: round robin, as if unpinned
        meta = post(old.url + "/generate", {"text": "x", "data_parallel_rank": 3})[1]
        assert meta["meta_info"]["dp_rank"] == 3
        assert _pinned(old)[-2:] == [(ranks[-1], None), (3, "data_parallel_rank")]
        # 0.5.9 returns routed experts (since 0.5.7), with routed_experts_start_len
        body = {"text": "x", "return_routed_experts": True, "routed_experts_start_len": 1}
        assert "routed_experts" in post(old.url + "/generate", body)[1]["meta_info"]


def test_a_version_before_routed_experts_ignores_the_request_flag():
    with EmulatorServer(make_emulator(sglang_version="0.5.5.post3")) as old:
        meta = post(old.url + "/generate", {"text": "x", "return_routed_experts": True})[1]
        assert "routed_experts" not in meta["meta_info"]
        assert "enable_return_routed_experts" not in get(old.url + "/server_info")[1]
