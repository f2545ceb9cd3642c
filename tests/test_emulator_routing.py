"""The emulator's pure parts: routing sampler, request classes, placement locality, timing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scheduler.emulator.expert_location import (
    OTHER_NODE,
    SAME_GPU,
    SAME_NODE,
    dispatch_locality,
    load_expert_location,
    trivial_location,
)
from scheduler.emulator.routing import (
    ClassRouting,
    draw_request_routing,
    expand_to_hidden_layers,
    inclusion_probabilities,
    sample_token_experts,
)
from scheduler.emulator.timing import (
    CostModel,
    Hits,
    decode_step_s,
    expected_hits,
    token_moe_us,
)
from scheduler.emulator.workload import (
    DEFAULT_PROFILE,
    ESFT_STAND_INS,
    MIXTURE,
    build_workload,
    check_profile_model,
    load_routing_profile,
    prompt_index,
    prompt_key,
    read_prompt_corpus,
)
from scheduler.errors import ConfigError, InputError
from scheduler.model_shape import PRESETS, ModelShape
from scheduler.profile import load_profile

# ----------------------------------------------------------------------------- sampler


def test_inclusion_probabilities_cap_at_one_and_keep_top_k():
    shares = np.array([[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    pi = inclusion_probabilities(shares, 2)
    np.testing.assert_allclose(pi.sum(axis=1), [2, 2])
    assert pi.max() <= 1.0
    np.testing.assert_allclose(pi[0], [1.0, 0.6, 0.2, 0.2])
    np.testing.assert_allclose(pi[1], [0.5] * 4)


def test_sampled_experts_are_distinct_and_follow_inclusion_probabilities():
    rng = np.random.default_rng(0)
    pi = np.array([[1.0, 0.5, 0.5, 0.0, 0.0, 1.0], [0.2, 0.4, 0.6, 0.8, 0.0, 1.0]])
    ids = sample_token_experts(pi, 20000, 3, rng)
    assert ids.shape == (20000, 2, 3) and ids.dtype == np.int32
    assert all(len(set(row)) == 3 for row in ids.reshape(-1, 3)[:2000].tolist())
    for layer in range(2):
        freq = np.bincount(ids[:, layer].ravel(), minlength=6) / 20000
        np.testing.assert_allclose(freq, pi[layer], atol=0.015)
    assert sample_token_experts(pi, 0, 3, rng).shape == (0, 2, 3)


def test_request_draws_vary_around_the_class_and_share_prefill_with_decode():
    rng = np.random.default_rng(1)
    base = np.array([[0.4, 0.3, 0.2, 0.1, 0.0]])
    routing = ClassRouting(prefill=base, decode=base[:, ::-1].copy())
    draws = [draw_request_routing(routing, 2, 50.0, rng) for _ in range(400)]
    prefill = np.stack([d.prefill for d in draws])
    assert np.all(prefill[:, 0, 4] == 0)  # an expert the profile never saw stays unused
    assert prefill.std(axis=0).max() > 0.01  # requests differ
    np.testing.assert_allclose(prefill.mean(axis=0), 2 * base, atol=0.02)
    decode = np.stack([d.decode for d in draws])
    # the same per-request perturbation moves prefill and decode alike
    ratio_pre = prefill[:, 0, 1] / prefill[:, 0, 2]
    ratio_dec = decode[:, 0, 1] / decode[:, 0, 2]
    np.testing.assert_allclose(ratio_dec, ratio_pre * (0.1 / 0.3) / (0.2 / 0.2))
    fixed = draw_request_routing(routing, 2, float("inf"), rng)
    np.testing.assert_allclose(fixed.prefill, 2 * base)


def test_expand_to_hidden_layers_zeroes_dense_rows(tiny_model):
    ids = np.ones((3, tiny_model.num_moe_layers, tiny_model.top_k), dtype=np.int32)
    out = expand_to_hidden_layers(ids, tiny_model)
    assert out.shape == (3, 4, 2)
    assert (out[:, 0] == 0).all() and (out[:, 1:] == 1).all()


# ----------------------------------------------------------------------------- classes


def test_esft_domains_stand_in_for_ours_and_unknown_prompts_get_the_default():
    profile = load_profile(DEFAULT_PROFILE)
    index = prompt_index(
        [("p code", "code"), ("p math", "math"), ("p both", "general"), ("p both", "chat")]
    )
    workload = build_workload(profile, index)
    assert workload.domain_to_class == {d: e for e, d in ESFT_STAND_INS.items()}
    assert workload.class_of(prompt_key("p code")) == ("translation", "corpus:code")
    assert workload.class_of(prompt_key("p both")) == ("intent", "corpus:chat")
    assert workload.class_of(prompt_key("never seen")) == ("summary", "default")
    assert workload.class_of(None) == ("summary", "default")
    mixture = build_workload(profile, index, default=MIXTURE)
    picks = {mixture.class_of(prompt_key(f"unknown {i}"))[0] for i in range(200)}
    assert picks == set(profile.classes)
    assert mixture.class_of(prompt_key("unknown 7")) == mixture.class_of(prompt_key("unknown 7"))
    with pytest.raises(ConfigError, match="default-class"):
        build_workload(profile, index, default="poetry")
    with pytest.raises(ConfigError, match="class-map"):
        build_workload(profile, index, class_map={"code": "nope"})


def test_profile_must_fit_the_model():
    profile = load_profile(DEFAULT_PROFILE)
    check_profile_model(profile, PRESETS["deepseek-v2-lite"], "x")
    with pytest.raises(ConfigError, match="--profile"):
        check_profile_model(profile, PRESETS["deepseek-v3"], "x")


def test_prompt_corpus_reader(tmp_path):
    import gzip

    (tmp_path / "code").mkdir()
    with gzip.open(tmp_path / "code" / "code_prompts.jsonl.gz", "wt") as f:
        f.write(json.dumps({"prompt": "print(1)", "domain": "code"}) + "\n\n")
    index = read_prompt_corpus(tmp_path)
    assert index.domain_of(prompt_key("print(1)")) == "code" and len(index) == 1
    (tmp_path / "math").mkdir()
    (tmp_path / "math" / "bad.jsonl").write_text('{"prompt": 3, "domain": "math"}\n')
    with pytest.raises(InputError, match="bad.jsonl: line 1"):
        read_prompt_corpus(tmp_path)


def test_real_data_profile_and_corpus(shared_data):
    profile, source = load_routing_profile(None, shared_data)
    assert "esft" in source and set(profile.classes) == set(ESFT_STAND_INS)
    shipped = load_profile(DEFAULT_PROFILE)
    for name, c in profile.classes.items():  # the shipped fallback is the same aggregate
        np.testing.assert_array_equal(c.counts["prefill"], shipped.classes[name].counts["prefill"])
    index = read_prompt_corpus(shared_data / "prompts")
    workload = build_workload(profile, index)
    import gzip

    with gzip.open(shared_data / "prompts" / "math" / "math_prompts.jsonl.gz", "rt") as f:
        prompt = json.loads(f.readline())["prompt"]
    assert workload.class_of(prompt_key(prompt)) == ("law", "corpus:math")


# ----------------------------------------------------------------------------- placement


def _write(tmp_path, data, name="loc.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_dispatch_locality_prefers_gpu_then_node(tiny_model):
    # 2 nodes x 2 GPUs, 8 experts + 4 redundant = 12 slots, 3 per GPU.
    row = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    layers = [[0] * 12] + [row] * 3
    placement = load_expert_location(
        json.dumps({"physical_to_logical_map": layers}), tiny_model, 4, gpus_per_node=2
    )
    assert placement.num_slots == 12 and placement.num_nodes == 2
    loc = dispatch_locality(placement)
    assert loc.shape == (4, 3, 8)
    # GPU 0 holds 0,1,2; GPU 1 holds 3,4,5 (node 0); GPU 2 holds 6,7,0; GPU 3 holds 1,2,3.
    assert loc[0, 0].tolist() == [SAME_GPU] * 3 + [SAME_NODE] * 3 + [OTHER_NODE] * 2
    assert loc[3, 0].tolist() == (
        [SAME_NODE, SAME_GPU, SAME_GPU, SAME_GPU, OTHER_NODE, OTHER_NODE, SAME_NODE, SAME_NODE]
    )
    single_node = dispatch_locality(trivial_location(tiny_model, 4, 4))
    assert (single_node != OTHER_NODE).all()


@pytest.mark.parametrize(
    "data, problem",
    [
        ({"physical_to_logical_map": [[0] * 8] * 3}, "one row per hidden layer"),
        ({"physical_to_logical_map": [[0] * 8] * 4, "extra": 1}, "extra key"),
        ({"physical_to_logical_map": [list(range(8))] * 3 + [list(range(7))]}, "width"),
        ({"physical_to_logical_map": [list(range(8)) + [0, 1]] * 4}, "not divisible"),
        ({"physical_to_logical_map": [list(range(7)) + [9]] * 4}, "[0, 8)"),
        ({"physical_to_logical_map": [[0] * 8] * 4}, "have no slot"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_placement_errors_name_the_file_and_problem(tmp_path, tiny_model, data, problem):
    path = _write(tmp_path, data)
    with pytest.raises(InputError) as err:
        load_expert_location(path, tiny_model, 4, 2)
    assert path in str(err.value) and problem in str(err.value)


def test_placement_file_problems(tmp_path, tiny_model):
    with pytest.raises(InputError, match="does not exist"):
        load_expert_location(str(tmp_path / "missing.json"), tiny_model, 4, 2)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        load_expert_location(str(tmp_path / "bad.json"), tiny_model, 4, 2)
    with pytest.raises(InputError, match="not divisible"):
        trivial_location(tiny_model, 3, 3)
    with pytest.raises(InputError, match="torch"):
        load_expert_location(str(tmp_path / "placement.pt"), tiny_model, 4, 2)
    good = load_expert_location(
        _write(tmp_path, {"physical_to_logical_map": [list(range(8))] * 4}), tiny_model, 4, 2
    )
    np.testing.assert_array_equal(good.phy2log, trivial_location(tiny_model, 4, 2).phy2log)


# ----------------------------------------------------------------------------- timing


def test_cost_model_charges_remote_experts_more():
    model: ModelShape = PRESETS["deepseek-v3"]
    cost = CostModel()
    pi = np.full((model.num_moe_layers, model.num_experts), model.top_k / model.num_experts)
    local = expected_hits(pi, np.full(pi.shape, SAME_NODE))
    remote = expected_hits(pi, np.full(pi.shape, OTHER_NODE))
    np.testing.assert_allclose(remote.other_node, model.top_k)
    assert token_moe_us(cost, model, remote) > 4 * token_moe_us(cost, model, local)
    # DeepEP sanity check (prior-work.md §5.3): 128 tokens x 8 remote copies per layer
    # move ~7.6 MB of FP8 dispatch, ~170 us at ~45 GB/s; here dispatch + combine at 50 GB/s.
    per_layer = token_moe_us(cost, model, remote) / model.num_moe_layers * 128
    assert 400 < per_layer < 600
    assert decode_step_s(cost, model, 10.0) > decode_step_s(cost, model, 0.0)
    zero = Hits(np.zeros(3), np.zeros(3))
    assert zero.other_node_per_token_layer == 0
    with pytest.raises(ValueError, match="inter_node_gbps"):
        CostModel(inter_node_gbps=0)
