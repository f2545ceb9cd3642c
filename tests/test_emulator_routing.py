"""The emulator's pure parts: routing sampler, request classes, placement, expected traffic
and timing (on the accounting's dispatch table and cost model)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scheduler.accounting import CostModel, account, bytes_per_copy, static_dispatch_table
from scheduler.class_map import ESFT_STAND_INS
from scheduler.emulator.core import Emulator, EmulatorConfig
from scheduler.emulator.expert_location import load_expert_location, trivial_location
from scheduler.emulator.routing import (
    ClassRouting,
    class_routing,
    draw_request_routing,
    expand_to_hidden_layers,
    inclusion_probabilities,
    sample_token_experts,
)
from scheduler.emulator.timing import (
    EmulatorTiming,
    ServingOverheads,
    TokenTraffic,
    expected_copies,
    held_experts,
)
from scheduler.emulator.workload import (
    DEFAULT_PROFILE,
    MIXTURE,
    PromptIndex,
    Workload,
    build_workload,
    check_profile_model,
    load_routing_profile,
    prompt_index,
    prompt_key,
    read_prompt_corpus,
)
from scheduler.errors import ConfigError, InputError
from scheduler.model_shape import PRESETS, ModelShape
from scheduler.placement.topology import GPU_PRESETS, Topology
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


def test_expected_copies_follow_the_accountings_static_dispatch(tiny_model):
    # 2 nodes x 2 GPUs, 8 experts + 4 redundant = 12 slots, 3 per GPU.
    row = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    layers = [[0] * 12] + [row] * 3
    placement = load_expert_location(
        json.dumps({"physical_to_logical_map": layers}), tiny_model, 4, gpus_per_node=2
    )
    assert placement.num_slots == 12 and placement.num_nodes == 2
    dest = static_dispatch_table(placement)
    # GPU 0 holds 0,1,2; GPU 1 holds 3,4,5 (node 0); GPU 2 holds 6,7,0; GPU 3 holds 1,2,3.
    # Rank 0 reaches 0-2 on itself, 3-5 on GPU 1 (3: the node's lowest slot), 6-7 on node 1.
    assert dest[0, 0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    pi = np.full((3, 8), 2 / 8)  # top-2, uniform
    copies = expected_copies(pi, dest[0], 0, 2, 2)
    np.testing.assert_allclose(copies.node_copies, 1 - 0.75**2)  # experts 6, 7
    np.testing.assert_allclose(copies.intra_node_copies, 1 - 0.75**3)  # experts 3, 4, 5
    np.testing.assert_allclose(copies.pairs, 2)
    certain = np.zeros((3, 8))
    certain[:, [6, 7]] = 1.0  # both experts on GPU 2: one node copy, never two
    hot = expected_copies(certain, dest[0], 0, 2, 2).mean()
    assert (hot.node_copies, hot.intra_node_copies, hot.pairs) == (1.0, 0.0, 2.0)
    single_node = static_dispatch_table(trivial_location(tiny_model, 4, 4))
    for rank in range(4):
        assert expected_copies(pi, single_node[rank], rank, 1, 4).node_copies.max() == 0


def test_expected_copies_agree_with_the_exact_accounting_of_drawn_tokens():
    """Independence across experts vs the sampler's exact top-k draw: expected node and
    intra-node copies within 10 % below the accounting's exact count, never above."""
    model = PRESETS["deepseek-v2-lite"]
    profile = load_profile(DEFAULT_PROFILE)
    rng = np.random.default_rng(3)
    for nodes, per_node, redundant in ((2, 4, 0), (4, 2, 8)):
        placement = trivial_location(model, nodes * per_node, per_node, redundant)
        dest = static_dispatch_table(placement)
        topology = Topology(nodes, per_node)
        for name in ("law", "translation"):
            pi = inclusion_probabilities(class_routing(profile.classes[name]).prefill, 6)
            for rank in (0, nodes * per_node - 1):
                expected = expected_copies(pi, dest[rank], rank, nodes, per_node).mean()
                ids = sample_token_experts(pi, 8000, model.top_k, rng)
                exact = account(placement, topology, model, np.full(8000, rank), ids)
                for ours, theirs in (
                    (expected.node_copies, exact.node_copies_per_token_layer),
                    (expected.intra_node_copies, exact.intra_node_copies_per_token_layer),
                ):
                    assert 0.9 * theirs <= ours <= 1.01 * theirs, (nodes, name, rank)
                assert expected.pairs == pytest.approx(6.0)


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

V3: ModelShape = PRESETS["deepseek-v3"]


def _timing(cost: CostModel | None = None, held: float = 4.0, ranks: int = 64) -> EmulatorTiming:
    return EmulatorTiming(cost or CostModel(), V3, ServingOverheads(), np.full(ranks, held))


def test_a_moe_layer_is_the_accounting_cost_models_layer_time():
    timing = _timing()
    traffic = TokenTraffic(node_copies=128 * 3.5, intra_node_copies=128 * 1.2, pairs=128 * 8)
    distinct = 4.0 * (1 - np.exp(-traffic.pairs / 4.0))
    layer = CostModel().layer_time(
        traffic.node_copies,
        traffic.intra_node_copies,
        traffic.pairs,
        bytes_per_copy(7168),
        V3,
        distinct,
    )
    assert timing.moe_layer_us(traffic, 0) == pytest.approx(layer.total_us)
    step = timing.decode_step_s(traffic, 0)
    assert step == pytest.approx((5e3 + V3.num_moe_layers * layer.total_us) / 1e6)
    # DeepEP sanity check: 128 tokens x 8 experts on other nodes of EP 64 (1 - 8/64 of
    # the copies cross nodes; low-latency kernels send one copy per expert): published
    # dispatch + combine 487 us (cost_model.DEEPEP_LOW_LATENCY).
    remote = 128 * 8 * (1 - 8 / 64)
    a2a = timing.moe_layer_us(TokenTraffic(remote, 128 * 8 - remote, 0.0), 0)
    assert 0.8 * 487 < a2a < 1.2 * 487


def test_remote_experts_cost_more_and_the_step_grows_with_the_batch():
    timing = _timing()
    local = TokenTraffic(0.0, 2.0, 8.0)
    remote = TokenTraffic(4.0, 2.0, 8.0)
    assert timing.decode_step_s(remote.times(32), 0) > timing.decode_step_s(local.times(32), 0)
    assert timing.decode_step_s(local.times(32), 0) > timing.decode_step_s(local, 0) > 5e-3
    assert timing.prefill_s(2000, remote, 0) > timing.prefill_s(2000, local, 0)
    assert timing.prefill_s(2000, local, 0) > timing.prefill_s(100, local, 0)
    # expert time: BF16 weights take twice the reads of FP8; a slower GPU takes longer
    bf16 = _timing(CostModel(expert_weights="bf16"))
    assert bf16.moe_layer_us(local, 0) > timing.moe_layer_us(local, 0)
    h20 = _timing(CostModel(gpu=GPU_PRESETS["H20"]))
    assert h20.moe_layer_us(local.times(512), 0) > timing.moe_layer_us(local.times(512), 0)
    # a GPU holding more distinct experts reads more weights for the same pairs
    assert _timing(held=16).moe_layer_us(local.times(8), 0) > timing.moe_layer_us(local.times(8), 0)
    with pytest.raises(ValueError, match="step_fixed_ms"):
        ServingOverheads(step_fixed_ms=-1)


def test_held_experts_counts_distinct_experts_per_gpu(tiny_model):
    np.testing.assert_allclose(held_experts(trivial_location(tiny_model, 4, 2)), [2, 2, 2, 2])
    # 12 slots over 4 GPUs: 3 slots each; GPU 0 of trivial+4 holds 0,1,2
    np.testing.assert_allclose(held_experts(trivial_location(tiny_model, 4, 2, 4)), [3] * 4)


def test_a_class_served_on_the_node_of_its_hot_experts_is_faster():
    """Emulator level: hot experts on GPU 0 (node 0). Rank 0 reaches them on its own GPU,
    rank 1 over NVLink, rank 2 (node 1) over the NIC: latencies in that order. (NIC and
    NVLink run concurrently, so rank 1's NVLink copies only show because rank 0's few
    NIC copies take less time than them.)"""
    model = ModelShape("hot", 2, (0, 1), 8, 2, 7168, 2048)
    shares = np.full((2, 8), 0.02 / 6)
    shares[:, [0, 1]] = 0.49  # experts 0 and 1 live on GPU 0 in the trivial placement
    workload = Workload(
        routing={"hot": ClassRouting(shares, shares)},
        weights={"hot": 1.0},
        domain_to_class={},
        default="hot",
        index=PromptIndex(),
    )
    placement = trivial_location(model, 4, 2)
    emulator = Emulator(EmulatorConfig(nodes=2, gpus_per_node=2), model, placement, workload)
    by_rank = [emulator._class_locality("hot", rank) for rank in range(4)]
    assert by_rank[0].decode.node_copies < by_rank[2].decode.node_copies
    assert by_rank[1].decode.intra_node_copies > by_rank[0].decode.intra_node_copies
    timing = emulator.timing_model
    steps = [timing.decode_step_s(by_rank[r].decode.times(32), r) for r in range(3)]
    prefills = [timing.prefill_s(4000, by_rank[r].prefill, r) for r in range(3)]
    assert steps[0] < steps[1] < steps[2]
    assert prefills[0] < prefills[1] < prefills[2]
