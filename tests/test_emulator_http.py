"""The emulator over real HTTP on an ephemeral loopback port (no timing assertions)."""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from scheduler.emulator.core import Emulator, estimate_prompt_tokens
from scheduler.emulator.workload import DEFAULT_PROFILE
from scheduler.profile import load_profile
from scheduler.traces.importers import sglang_generate
from scheduler.traces.importers.sglang_generate import decode_routed_experts
from tests.emulator_harness import (
    MODEL,
    EmulatorServer,
    get,
    make_emulator,
    post,
    post_stream,
    rank_load,
    wait_for_load,
)

CODE_PROMPT = "def add(a, b):\n    return a + b\n"
MATH_PROMPT = "What is 12 times 7? Show your work."
PROMPTS = [(CODE_PROMPT, "code"), (MATH_PROMPT, "math")]


@pytest.fixture(scope="module")
def server():
    with EmulatorServer(make_emulator(prompts=PROMPTS)) as s:
        yield s


def generate(server, **body):
    body.setdefault("text", MATH_PROMPT)
    status, response = post(server.url + "/generate", body)
    assert status == 200, response
    return response


def test_server_info_reports_the_cluster(server):
    for path in ("/server_info", "/get_server_info"):
        status, info = get(server.url + path)
        assert status == 200
        assert info["attn_dp_size"] == 4 and info["dp_size"] == 1
        assert info["enable_dp_attention"] is True
        assert info["nnodes"] == 2 and info["tp_size"] == 4 and info["ep_size"] == 4
        assert info["ep_num_redundant_experts"] == 0
        assert info["init_expert_location"] == "trivial"
        assert "not measured" in info["emulator"]["note"] or "drawn" in info["emulator"]["note"]
        cost = info["emulator"]["cost_model"]  # the accounting's CostModel, as JSON
        assert cost["gpu"]["name"] == "H100" and cost["expert_weights"] == "fp8"
        assert info["emulator"]["serving_overheads"]["step_fixed_ms"] == 5.0


@pytest.mark.parametrize("field", ["routed_dp_rank", "data_parallel_rank"])
def test_routed_dp_rank_is_honoured_and_reported(server, field):
    for rank in (3, 0, 2, 1, 3):
        response = generate(server, **{field: rank})
        assert response["meta_info"]["dp_rank"] == rank


def test_requests_without_a_rank_go_round_robin(server):
    ranks = [generate(server)["meta_info"]["dp_rank"] for _ in range(8)]
    assert sorted(ranks) == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize(
    "body, message",
    [
        ({"text": "x", "routed_dp_rank": 4}, "out of range"),
        ({"text": "x", "routed_dp_rank": -1}, "routed_dp_rank"),
        ({"text": "x", "data_parallel_rank": 4}, "out of range"),
        ({"text": ["a", "b"]}, "batch"),
        ({"sampling_params": {}}, "text and input_ids"),
        ({"text": "x", "routed_experts_start_len": 99}, "routed_experts_start_len"),
        ({"text": "x", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
        (b"{not json", "not JSON"),
    ],
)
def test_bad_requests_are_400_with_a_message(server, body, message):
    status, response = post(server.url + "/generate", body)
    assert status == 400
    assert message in response["error"]["message"]


def test_routed_dp_rank_wins_over_its_deprecated_alias_as_in_sglang(server):
    # GenerateReqInput copies data_parallel_rank only when routed_dp_rank is unset
    response = generate(server, routed_dp_rank=1, data_parallel_rank=2)
    assert response["meta_info"]["dp_rank"] == 1


def test_routed_experts_decode_to_the_documented_shape(server):
    completion = 5
    response = generate(
        server, sampling_params={"max_new_tokens": completion}, return_routed_experts=True
    )
    meta = response["meta_info"]
    prompt = estimate_prompt_tokens(MATH_PROMPT)
    assert meta["prompt_tokens"] == prompt and meta["completion_tokens"] == completion
    assert meta["finish_reason"] == {"type": "length", "length": completion}
    assert len(response["output_ids"]) == completion
    ids = decode_routed_experts(meta["routed_experts"], MODEL)
    assert ids.shape == (prompt + completion - 1, MODEL.num_hidden_layers, MODEL.top_k)
    dense = [i for i in range(MODEL.num_hidden_layers) if i not in MODEL.moe_layer_ids]
    assert (ids[:, dense] == 0).all()
    moe = ids[:, list(MODEL.moe_layer_ids)]
    assert moe.min() >= 0 and moe.max() < MODEL.num_experts
    assert all(len(set(row)) == MODEL.top_k for row in moe.reshape(-1, MODEL.top_k).tolist())

    # routed_experts_start_len drops leading rows; the routing itself is deterministic
    again = generate(
        server,
        sampling_params={"max_new_tokens": completion},
        return_routed_experts=True,
        routed_experts_start_len=3,
    )
    tail = decode_routed_experts(again["meta_info"]["routed_experts"], MODEL)
    np.testing.assert_array_equal(tail, ids[3:])
    assert "routed_experts" not in generate(server)["meta_info"]


def test_our_importer_reads_emulated_responses_with_the_right_phases(server, tmp_path):
    lines = []
    for completion in (1, 4):
        response = generate(
            server, sampling_params={"max_new_tokens": completion}, return_routed_experts=True
        )
        lines.append(json.dumps({**response, "prompt": MATH_PROMPT}))
    path = tmp_path / "responses.jsonl"
    path.write_text("\n".join(lines) + "\n")
    records = list(sglang_generate.read(path, MODEL).records)
    prompt = estimate_prompt_tokens(MATH_PROMPT)
    assert [r.tokens.get("prefill") for r in records] == [prompt, prompt]
    assert [r.tokens.get("decode", 0) for r in records] == [0, 3]


def test_streaming_yields_tokens_in_order_then_done(server):
    body = {"text": CODE_PROMPT, "sampling_params": {"max_new_tokens": 6}}
    streamed = {**body, "stream": True, "return_routed_experts": True}
    events = post_stream(server.url + "/generate", streamed)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["meta_info"]["completion_tokens"] for c in chunks] == [1, 2, 3, 4, 5, 6]
    for before, after in zip(chunks, chunks[1:], strict=False):
        assert after["text"].startswith(before["text"])
        assert len(after["text"]) > len(before["text"])
        assert after["output_ids"][: len(before["output_ids"])] == before["output_ids"]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert all("routed_experts" not in c["meta_info"] for c in chunks[:-1])
    final = chunks[-1]["meta_info"]
    assert final["finish_reason"] == {"type": "length", "length": 6}
    assert decode_routed_experts(final["routed_experts"], MODEL).shape[0] == (
        final["prompt_tokens"] + 6 - 1
    )
    # the same request without streaming produces the same tokens
    assert generate(server, **body)["text"] == chunks[-1]["text"]


def test_class_comes_from_the_prompt_corpus(server):
    meta = generate(server, text=CODE_PROMPT)["meta_info"]["emulator"]
    assert (meta["class"], meta["class_from"]) == ("translation", "corpus:code")
    meta = generate(server, text=MATH_PROMPT)["meta_info"]["emulator"]
    assert (meta["class"], meta["class_from"]) == ("law", "corpus:math")
    # 2 nodes, trivial placement: about one other node per token-layer
    assert 0.5 < meta["expected_node_copies_per_token_layer"] <= 1
    assert 0 < meta["expected_intra_node_copies_per_token_layer"] <= 1
    assert 5e-3 < meta["modelled_s_per_token"] < meta["modelled_prefill_s"]
    meta = generate(server, text="a prompt nobody wrote")["meta_info"]["emulator"]
    assert (meta["class"], meta["class_from"]) == ("summary", "default")
    meta = generate(server, text=None, input_ids=[1, 2, 3])["meta_info"]
    assert meta["prompt_tokens"] == 3 and meta["emulator"]["class_from"] == "default"


def test_v1_loads_lists_every_rank_and_filters(server):
    status, body = get(server.url + "/v1/loads")
    assert status == 200 and [x["dp_rank"] for x in body["loads"]] == [0, 1, 2, 3]
    assert body["loads"][0]["max_running_requests"] == 8
    # SGLang's LoadSnapshot.to_dict: the core fields come whatever the sections asked for
    status, body = get(server.url + "/v1/loads?include=queues&dp_rank=2")
    assert status == 200 and len(body["loads"]) == 1
    assert "queues" in body["loads"][0] and "num_running_reqs" in body["loads"][0]
    assert "disaggregation" not in body["loads"][0]
    assert get(server.url + "/v1/loads?include=bogus")[0] == 400
    # a rank that does not exist has no snapshot: 200 and an empty list, as in SGLang
    for rank in (9, -1):
        status, body = get(f"{server.url}/v1/loads?dp_rank={rank}")
        assert status == 200 and body["loads"] == []


def test_fail_switch_on_an_idle_rank_is_skipped_by_round_robin(server):
    assert post(server.url + "/admin/ranks/1", {"mode": "fail"}) == (
        200,
        {"dp_rank": 1, "mode": "fail", "instance": "up"},
    )
    try:
        ranks = {generate(server)["meta_info"]["dp_rank"] for _ in range(6)}
        assert ranks == {0, 2, 3}
        assert get(server.url + "/admin/ranks")[1]["modes"] == ["ok", "fail", "ok", "ok"]
    finally:
        post(server.url + "/admin/ranks/1", {"mode": "ok"})
    assert generate(server, routed_dp_rank=1)["meta_info"]["dp_rank"] == 1
    assert post(server.url + "/admin/ranks/1", {"mode": "sideways"})[0] == 400
    assert post(server.url + "/admin/ranks/7", {"mode": "ok"})[0] == 400
    assert post(server.url + "/admin/ranks/1", {"mode": "fail", "restart_after_s": -1})[0] == 400


def test_hang_switch_holds_requests_until_released(server):
    post(server.url + "/admin/ranks/2", {"mode": "hang"})
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(generate, server, routed_dp_rank=2) for _ in range(2)]
        load = wait_for_load(server.url, 2, num_waiting_reqs=2)
        assert load["num_running_reqs"] == 0 and load["queues"]["paused"] == 2
        assert not any(f.done() for f in futures)
        post(server.url + "/admin/ranks/2", {"mode": "ok"})
        assert [f.result()["meta_info"]["dp_rank"] for f in futures] == [2, 2]
    assert rank_load(server.url, 2)["num_waiting_reqs"] == 0


def test_a_client_that_disconnects_aborts_its_request(server):
    post(server.url + "/admin/ranks/0", {"mode": "hang"})
    try:
        host, port = server.url.removeprefix("http://").split(":")
        body = json.dumps({"text": "x", "routed_dp_rank": 0}).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            wait_for_load(server.url, 0, num_waiting_reqs=1)
        wait_for_load(server.url, 0, num_waiting_reqs=0, num_running_reqs=0)
    finally:
        post(server.url + "/admin/ranks/0", {"mode": "ok"})


def test_capacity_queues_requests_instead_of_dropping_them():
    # Capacity 1 and a huge time scale: the first request holds the only slot of rank 0.
    with EmulatorServer(make_emulator(capacity=1, time_scale=1e6)) as s:
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(generate, s, routed_dp_rank=0) for _ in range(3)]
            load = wait_for_load(s.url, 0, num_running_reqs=1, num_waiting_reqs=2)
            assert load["num_total_tokens"] > load["num_used_tokens"] > 0
            assert rank_load(s.url, 1)["num_running_reqs"] == 0
            assert post(s.url + "/admin/config", {"time_scale": 0}) == (200, {"time_scale": 0.0})
            results = [f.result() for f in futures]
        assert [r["meta_info"]["dp_rank"] for r in results] == [0, 0, 0]
        load = rank_load(s.url, 0)
        assert (load["num_running_reqs"], load["num_waiting_reqs"]) == (0, 0)
        assert load["emulator"]["finished_reqs"] == 3


def test_same_seed_same_routing_other_seed_other_routing(server):
    body = {"text": CODE_PROMPT, "return_routed_experts": True}
    first = generate(server, **body)["meta_info"]["routed_experts"]
    assert generate(server, **body)["meta_info"]["routed_experts"] == first
    with EmulatorServer(make_emulator(prompts=PROMPTS, seed=1)) as other:
        assert generate(other, **body)["meta_info"]["routed_experts"] != first


def test_emulated_histograms_match_the_class_profiles(server):
    """Statistical check, fixed seed: per-layer expert frequencies of many emulated
    requests are close to the real profile of their class, and closer to it than to any
    other class's profile."""
    profile = load_profile(DEFAULT_PROFILE)
    shares = {
        name: c.counts["prefill"] / c.counts["prefill"].sum(axis=1, keepdims=True)
        for name, c in profile.classes.items()
    }
    for prompt_class, prompt in (("translation", CODE_PROMPT), ("law", MATH_PROMPT)):
        counts = np.zeros((MODEL.num_moe_layers, MODEL.num_experts))
        for i in range(150):
            # distinct max_new_tokens give distinct per-request draws of the same prompt
            response = generate(
                server,
                text=prompt,
                sampling_params={"max_new_tokens": 16 + i},
                return_routed_experts=True,
            )
            ids = decode_routed_experts(response["meta_info"]["routed_experts"], MODEL)
            moe = ids[:, list(MODEL.moe_layer_ids)]
            for layer in range(MODEL.num_moe_layers):
                counts[layer] += np.bincount(moe[:, layer].ravel(), minlength=MODEL.num_experts)
        freq = counts / counts.sum(axis=1, keepdims=True)
        tv = {n: 0.5 * np.abs(freq - s).sum(axis=1) for n, s in shares.items()}
        assert tv[prompt_class].max() < 0.05, tv[prompt_class].max()
        for other, distance in tv.items():
            if other != prompt_class:
                assert distance.mean() > 2 * tv[prompt_class].mean(), other


# ----------------------------------------------------------------------------- --api-key

API_KEY = "k3y-0f-the-3mulator"
UNAUTHORIZED = {"error": "Unauthorized"}


@pytest.fixture(scope="module")
def keyed_server():
    plain = make_emulator()
    config = dataclasses.replace(plain.config, api_key=API_KEY)
    emulator = Emulator(config, plain.model, plain.placement, plain.workload, profile_source="t")
    with EmulatorServer(emulator) as s:
        yield s


def request(
    server, method: str, path: str, authorization: str | None = None, body: object = None
) -> tuple[int, str, bytes]:
    """One raw HTTP/1.1 request (path sent as given): status, Content-Type, body bytes."""
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    data = None if body is None else json.dumps(body).encode()
    try:
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


def unauthorized(server, method: str, path: str, authorization: str | None = None) -> bool:
    status, ctype, raw = request(server, method, path, authorization, body={"text": "x"})
    return (
        status == 401 and ctype.startswith("application/json") and json.loads(raw) == UNAUTHORIZED
    )


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/generate"),
        ("GET", "/server_info"),
        ("GET", "/get_server_info"),
        ("GET", "/get_model_info"),
        ("GET", "/model_info"),
        ("GET", "/v1/models"),
        ("PUT", "/generate"),
        ("GET", "/v1/loads"),
        ("GET", "/admin/ranks"),
        ("GET", "/admin/requests"),
        ("POST", "/admin/instance"),
        ("POST", "/admin/ranks/0"),
        ("GET", "/admin/config"),
        ("POST", "/admin/config"),
        ("GET", "/no/such/path"),  # 401 before 404, as SGLang's middleware runs first
        ("GET", "/generate"),  # and before 405
        ("GET", "//health"),
        ("GET", "/v1/loads/../../health"),
    ],
)
def test_api_key_guards_every_endpoint_but_health(keyed_server, method, path):
    assert unauthorized(keyed_server, method, path)
    assert unauthorized(keyed_server, method, path, "Bearer wrong-key")


@pytest.mark.parametrize(
    "path", ["/health/../v1/loads", "/health/%2e%2e/v1/loads", "/health%2F..%2Fv1/loads"]
)
def test_an_exempt_prefix_does_not_reach_a_guarded_endpoint(keyed_server, path):
    # Exempt by prefix, as in SGLang, but routed as written (no dot-segment folding): 404.
    assert request(keyed_server, "GET", path)[0] == 404


@pytest.mark.parametrize(
    "authorization",
    [
        "",
        API_KEY,
        f"Basic {API_KEY}",
        f"Bearer  {API_KEY}",  # SGLang splits on the first space: the key gets a leading one
        f"Bearer\t{API_KEY}",
        f"Bearer {API_KEY}x",
        f"Bearer {API_KEY[:-1]}",
        f"Token {API_KEY}",
        "Bearer k3y-0f-the-3mulat\u00f6r",  # non-ASCII: SGLang answers 500, the emulator 401
    ],
)
def test_only_a_bearer_header_with_the_exact_key_passes(keyed_server, authorization):
    assert unauthorized(keyed_server, "GET", "/v1/loads", authorization)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_right_key_opens_every_endpoint(keyed_server, scheme):
    auth = f"{scheme} {API_KEY}"
    status, _, raw = request(keyed_server, "POST", "/generate", auth, {"text": "hello"})
    assert status == 200 and json.loads(raw)["meta_info"]["completion_tokens"] > 0
    paths = ("/server_info", "/get_model_info", "/model_info", "/v1/models", "/v1/loads")
    for path in (*paths, "/admin/ranks", "/admin/requests"):
        assert request(keyed_server, "GET", path, auth)[0] == 200, path
    status, _, raw = request(keyed_server, "POST", "/admin/config", auth, {"time_scale": 0})
    assert status == 200 and json.loads(raw) == {"time_scale": 0.0}
    assert request(keyed_server, "GET", "/no/such/path", auth)[0] == 404
    info = json.loads(request(keyed_server, "GET", "/server_info", auth)[2])
    assert info["emulator"]["api_key_required"] is True
    assert API_KEY not in json.dumps(info)


def test_streaming_needs_the_key_too(keyed_server):
    body = {"text": "hi", "stream": True, "sampling_params": {"max_new_tokens": 3}}
    status, ctype, raw = request(keyed_server, "POST", "/generate", None, body)
    assert (status, json.loads(raw)) == (401, UNAUTHORIZED)
    status, ctype, raw = request(keyed_server, "POST", "/generate", f"Bearer {API_KEY}", body)
    assert status == 200 and ctype.startswith("text/event-stream")
    assert raw.decode().endswith("data: [DONE]\n\n")


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/health", 200),
        ("GET", "/health_generate", 200),
        ("OPTIONS", "/generate", 405),  # passes the check; the emulator has no CORS preflight
        ("GET", "/ready", 200),
        ("GET", "/metrics", 404),  # exempt in SGLang; the emulator does not serve it
    ],
)
def test_health_ready_metrics_and_options_need_no_key(keyed_server, method, path, status):
    answered, _, raw = request(keyed_server, method, path)
    assert answered == status and b"Unauthorized" not in raw


def test_without_a_key_nothing_asks_for_one(server):
    status, _, raw = request(server, "GET", "/v1/loads", "Bearer anything")
    assert status == 200
    info = get(server.url + "/server_info")[1]
    assert info["emulator"]["api_key_required"] is False


@pytest.mark.parametrize("key", ["two words", "tab\tkey", "\u00e9t\u00e9", " lead"])
def test_keys_no_client_could_send_are_refused(key):
    with pytest.raises(ValueError, match="visible ASCII"):
        dataclasses.replace(make_emulator().config, api_key=key)


def test_an_empty_key_means_no_key_as_in_sglang():
    config = dataclasses.replace(make_emulator().config, api_key="")
    assert config.api_key is None
    assert API_KEY not in repr(dataclasses.replace(config, api_key=API_KEY))
