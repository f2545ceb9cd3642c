"""Accounting (scheduler.accounting): hand-computed cases, a slow reference, cost model."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler.accounting import (
    CostModel,
    account,
    bytes_per_copy,
    static_dispatch_table,
)
from scheduler.accounting.cost_model import (
    deepep_low_latency_check,
    deepgemm_check,
    relative_errors,
)
from scheduler.model_shape import PRESETS, ModelShape
from scheduler.placement.metrics import remote_cost
from scheduler.placement.placement import Placement
from scheduler.placement.topology import GPU_PRESETS, Topology, load_topology


def _model(layers: int, experts: int, top_k: int, hidden: int = 128) -> ModelShape:
    return ModelShape("tiny", layers, tuple(range(layers)), experts, top_k, hidden)


def _reference(
    placement: Placement, ranks: np.ndarray, token_ids: np.ndarray
) -> dict[str, np.ndarray | int]:
    """Slow, obviously-correct: loops over tokens, layers, experts, with dispatch from the
    rules written out replica by replica (the fair random choice, which
    tests/test_accounting_dispatch.py checks, is read from the table)."""
    g = placement.gpus_per_node
    gpu_of = placement.gpu_of_slot()
    table = static_dispatch_table(placement)
    n_gpus = placement.num_gpus
    remote = node_copies = intra = 0
    rank_copies = np.zeros(n_gpus, dtype=np.int64)
    load = np.zeros((placement.num_layers, n_gpus), dtype=np.int64)
    for t in range(token_ids.shape[0]):
        r = int(ranks[t])
        for layer in range(token_ids.shape[1]):
            nodes_hit: set[int] = set()
            gpus_hit: set[int] = set()
            for e in token_ids[t, layer]:
                if e < 0:
                    continue
                slots = [s for s in range(placement.num_slots) if placement.phy2log[layer, s] == e]
                gpus = [int(gpu_of[s]) for s in slots]
                on_node = [gpu for gpu in gpus if gpu // g == r // g]
                if r in gpus:
                    dest = r
                elif on_node and len(on_node) < len(gpus):
                    dest = on_node[0]  # the lowest slot on the node
                else:
                    dest = int(table[r, layer, e])
                    assert dest in gpus
                load[layer, dest] += 1
                if dest // g != r // g:
                    remote += 1
                    nodes_hit.add(dest // g)
                elif dest != r:
                    gpus_hit.add(dest)
            node_copies += len(nodes_hit)
            intra += len(gpus_hit)
            rank_copies[r] += len(nodes_hit)
    return {
        "remote": remote,
        "node_copies": node_copies,
        "intra": intra,
        "rank_copies": rank_copies,
        "load": load,
    }


def test_dispatch_prefers_same_gpu_then_same_node_then_fair_choice() -> None:
    # 2 nodes x 2 GPUs, 2 slots per GPU, 1 layer, 4 experts.
    # GPU0: 0 1 | GPU1: 2 0 | GPU2: 3 1 | GPU3: 2 1
    placement = Placement(np.array([[0, 1, 2, 0, 3, 1, 2, 1]]), 4, 4, 2)
    dest = static_dispatch_table(placement)
    assert dest.shape == (4, 1, 4) and dest.dtype == np.int32
    # expert 0 on GPUs 0 and 1 (node 0): ranks 0, 1 own it; ranks 2, 3 must cross nodes
    # and are dealt the two replicas fairly: one each.
    assert dest[0, 0, 0] == 0 and dest[1, 0, 0] == 1
    assert sorted(dest[2:, 0, 0].tolist()) == [0, 1]
    # expert 1 on GPUs 0, 2, 3: rank 1 has none of its own and takes node 0's GPU 0.
    assert dest[:, 0, 1].tolist() == [0, 0, 2, 3]
    # expert 2 on GPUs 1 and 3: rank 0 -> GPU 1 (same node), rank 2 -> GPU 3 (same node).
    assert dest[:, 0, 2].tolist() == [1, 1, 3, 3]
    # expert 3 only on GPU 2: the only replica, for every rank.
    assert dest[:, 0, 3].tolist() == [2, 2, 2, 2]


def test_every_replica_on_the_node_is_a_fair_choice() -> None:
    # 1 node x 4 GPUs, expert 0 on GPUs 1 and 3: the node filter does not narrow the
    # choice, so ranks 0 and 2 are dealt one replica each (SGLang draws at random).
    placement = Placement(np.array([[1, 2, 0, 1, 2, 3, 0, 3]]), 4, 4, 4)
    dest = static_dispatch_table(placement)[:, 0, 0].tolist()
    assert dest[1] == 1 and dest[3] == 3 and sorted([dest[0], dest[2]]) == [1, 3]


def test_hand_computed_metrics() -> None:
    # 2 nodes x 2 GPUs, 1 slot per GPU: expert e on GPU e; top-2; hidden 128.
    placement = Placement(np.array([[0, 1, 2, 3], [3, 2, 1, 0]]), 4, 4, 2)
    topology = Topology(2, 2)
    model = _model(2, 4, 2)
    ranks = np.array([0, 1, 3])
    token_ids = np.array(
        [
            [[1, 2], [0, 1]],  # rank 0: L0 GPU1 (intra), GPU2 (remote); L1 GPU3, GPU2
            [[2, 3], [3, -1]],  # rank 1: L0 GPUs 2, 3 (one node copy); L1 GPU0 (intra)
            [[-1, -1], [1, 0]],  # rank 3: L0 not recorded; L1 GPUs 2 (intra), 3 (own)
        ]
    )
    acc = account(placement, topology, model, ranks, token_ids, steps=np.array([7, 7, 9]))
    assert acc.token_layers == 5
    assert acc.remote_hits == 1 + 2 + 2 + 0 + 0
    assert acc.node_copies == 1 + 1 + 1 + 0 + 0
    assert acc.intra_node_copies == 1 + 0 + 0 + 1 + 1
    assert acc.rank_node_copies.tolist() == [2, 1, 0, 0]
    assert acc.rank_remote_hits.tolist() == [3, 2, 0, 0]
    size = bytes_per_copy(128)
    assert (size.dispatch, size.combine) == (128 + 4, 256)
    assert acc.inter_node_bytes == 3 * (132 + 256)
    assert acc.max_rank_inter_node_bytes == 2 * 388
    assert acc.rank_intra_node_bytes.tolist() == [388, 388, 0, 388]
    # GPU loads: L0 GPU1 1, GPU2 2, GPU3 1; L1 GPU3 1, GPU2 2, GPU0 1, GPU3 +1
    assert acc.gpu_load.tolist() == [[0, 1, 2, 1], [1, 0, 2, 2]]
    assert acc.gpu_load_imbalance.tolist() == pytest.approx([2.0, 1.6])
    assert acc.gpu_load_imbalance_mean == pytest.approx(1.8)
    assert acc.gpu_load_imbalance_worst == pytest.approx(2.0)
    assert acc.rank_tokens.tolist() == [1, 1, 0, 1]
    assert acc.rank_load_imbalance == pytest.approx(4 / 3)
    assert acc.remote_hits_per_token_layer == pytest.approx(1.0)
    steps = acc.steps
    assert steps is not None
    assert steps.steps.tolist() == [7, 9]
    assert steps.rank_inter_node_bytes.tolist() == [[776, 388, 0, 0], [0, 0, 0, 0]]
    assert steps.max_rank_inter_node_bytes.tolist() == [776, 0]
    assert steps.max_rank_intra_node_bytes.tolist() == [388, 388]


def test_fp8_scales_can_be_left_out() -> None:
    assert bytes_per_copy(7168).dispatch == 7168 + 56 * 4
    assert bytes_per_copy(7168, fp8_scales=False).dispatch == 7168
    assert bytes_per_copy(7168).combine == 2 * 7168


@pytest.mark.parametrize("seed", range(20))
def test_agrees_with_slow_reference_on_random_cases(seed: int) -> None:
    rng = np.random.default_rng(seed)
    nodes, per_node = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    gpus = nodes * per_node
    experts, layers, top_k = 6, 3, 3
    slots = gpus * int(rng.integers(2, 5))
    while slots < experts:
        slots += gpus
    phy2log = np.array(
        [
            rng.permutation(np.r_[np.arange(experts), rng.integers(0, experts, slots - experts)])
            for _ in range(layers)
        ]
    )
    placement = Placement(phy2log, experts, gpus, per_node)
    tokens = 40
    token_ids = np.array(
        [[rng.choice(experts, top_k, replace=False) for _ in range(layers)] for _ in range(tokens)]
    )
    token_ids[rng.random((tokens, layers)) < 0.1] = -1
    ranks = rng.integers(0, gpus, tokens)
    acc = account(
        placement, Topology(nodes, per_node), _model(layers, experts, top_k), ranks, token_ids
    )
    ref = _reference(placement, ranks, token_ids)
    assert acc.remote_hits == ref["remote"]
    assert acc.node_copies == ref["node_copies"]
    assert acc.intra_node_copies == ref["intra"]
    assert acc.rank_node_copies.tolist() == np.asarray(ref["rank_copies"]).tolist()
    assert acc.gpu_load.tolist() == np.asarray(ref["load"]).tolist()


def test_remote_hits_match_the_expected_metrics_for_single_replica_placements() -> None:
    # Single replicas: a token's remote hits do not depend on its rank within the node, so
    # tokens spread evenly over ranks give exactly the profile-based expected count.
    rng = np.random.default_rng(3)
    nodes, per_node, experts, layers, top_k = 3, 2, 12, 2, 4
    placement = Placement(
        np.array([rng.permutation(experts) for _ in range(layers)]), experts, 6, per_node
    )
    per_rank = 50
    ranks = np.repeat(np.arange(6), per_rank)
    token_ids = np.array(
        [[rng.choice(experts, top_k, replace=False) for _ in range(layers)] for _ in ranks]
    )
    acc = account(
        placement, Topology(nodes, per_node), _model(layers, experts, top_k), ranks, token_ids
    )
    node_dem = np.zeros((nodes, layers, experts))
    for t, r in enumerate(ranks):
        for layer in range(layers):
            node_dem[r // per_node, layer, token_ids[t, layer]] += 1
    expected, _ = remote_cost(node_dem, placement, Topology(nodes, per_node).link_cost)
    assert acc.remote_hits == pytest.approx(expected)


def test_rejects_mismatched_inputs() -> None:
    placement = Placement.trivial(2, 4, 4, 4, 2)
    model = _model(2, 4, 2)
    ids = np.zeros((3, 2, 2), dtype=np.int16)
    with pytest.raises(ValueError, match="topology"):
        account(placement, Topology(1, 4), model, np.zeros(3, dtype=np.int64), ids)
    with pytest.raises(ValueError, match="ranks"):
        account(placement, Topology(2, 2), model, np.array([0, 1, 4]), ids)
    with pytest.raises(ValueError, match="token_ids"):
        account(placement, Topology(2, 2), model, np.zeros(3, dtype=np.int64), ids + 4)


def test_cost_model_is_monotone_in_bytes_and_load() -> None:
    cost = CostModel.from_topology(Topology(4, 8))
    size = bytes_per_copy(7168)
    model = PRESETS["deepseek-v3"]
    base = cost.layer_time(100, 100, 4000, size, model, 8).total_us
    assert cost.layer_time(200, 100, 4000, size, model, 8).total_us > base
    assert cost.layer_time(100, 100, 8000, size, model, 8).total_us > base
    assert cost.layer_time(100, 1000, 4000, size, model, 8).total_us >= base
    slower = CostModel.from_topology(Topology(4, 8, inter_node_gbps=25.0))
    assert slower.layer_time(100, 100, 4000, size, model, 8).total_us > base
    assert cost.all_to_all_us(0, 0) == cost.latency_us


def test_cost_model_reproduces_deepep_low_latency_times() -> None:
    errors = relative_errors(deepep_low_latency_check())
    assert errors.shape == (5, 2)
    assert np.abs(errors).max() < 0.08  # every point within 8%; most within 4%


def test_mean_layer_time_from_an_accounting() -> None:
    placement = Placement.trivial(2, 8, 8, 4, 2)
    model = _model(2, 8, 2, hidden=7168)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 8, (64, 2, 2))
    acc = account(placement, Topology(2, 2), model, rng.integers(0, 4, 64), ids)
    time = CostModel().mean_layer_time(acc, model)
    assert time.dispatch_us > CostModel().latency_us and time.combine_us > time.dispatch_us
    assert time.total_us == pytest.approx(time.dispatch_us + time.compute_us + time.combine_us)


def test_expert_time_is_the_slower_of_flops_and_weight_reads() -> None:
    model = PRESETS["deepseek-v3"]  # 3 x 7168 x 2048 FP8 weights = 44 MB per expert
    cost = CostModel()  # H100: 3,350 GB/s HBM, 1,979 FP8 TFLOPS dense
    assert cost.expert_bytes(model) == 3 * 7168 * 2048
    # Decode: 128 tokens x 8 experts over 8 distinct experts is bound by weight reads.
    decode = cost.layer_time(0, 0, 128, bytes_per_copy(7168), model, 8)
    assert decode.compute_us == pytest.approx(decode.weight_read_us) and decode.flop_us < (
        decode.weight_read_us
    )
    assert decode.weight_read_us == pytest.approx(8 * 3 * 7168 * 2048 / (0.59 * 3350e3))
    # Fewer distinct experts for the same pairs: less time (what ELDR optimises).
    fewer = cost.layer_time(0, 0, 128, bytes_per_copy(7168), model, 4)
    assert fewer.compute_us < decode.compute_us
    # Prefill: 16k pairs over the same 8 experts is bound by FLOPs.
    prefill = cost.layer_time(0, 0, 16384, bytes_per_copy(7168), model, 8)
    assert prefill.compute_us == pytest.approx(prefill.flop_us)
    assert prefill.flop_us > prefill.weight_read_us
    # BF16 weights: twice the bytes, half the peak.
    bf16 = CostModel(expert_weights="bf16")
    assert bf16.weight_read_us(8, model) == pytest.approx(2 * cost.weight_read_us(8, model))
    assert bf16.flop_us(16384, model) == pytest.approx(
        cost.flop_us(16384, model)
        * GPU_PRESETS["H100"].fp8_tflops
        / GPU_PRESETS["H100"].bf16_tflops
    )


def test_cost_model_reproduces_deepgemm_times() -> None:
    rows = deepgemm_check()
    errors = np.array([r["modelled_us"] / r["published_us"] - 1 for r in rows])
    assert len(rows) == 16 and np.abs(errors).max() < 0.2
    assert {r["bound"] for r in rows if r["tokens"] <= 128} == {"weights"}


def test_padded_layer_time_reads_distinct_experts_per_gpu() -> None:
    model = _model(1, 8, 1, hidden=7168)
    placement = Placement.trivial(1, 8, 8, 2, 2)  # GPU 0: experts 0-3, GPU 1: 4-7
    topology = Topology(1, 2)
    cost = CostModel()
    same = account(
        placement,
        topology,
        model,
        np.zeros(4, np.int64),
        np.zeros((4, 1, 1), np.int64),
        per_layer=True,
    )
    spread = account(
        placement,
        topology,
        model,
        np.zeros(4, np.int64),
        np.array([0, 1, 2, 3]).reshape(4, 1, 1),
        per_layer=True,
    )
    assert same.gpu_distinct_experts.tolist() == [[1, 0]]
    assert spread.gpu_distinct_experts.tolist() == [[4, 0]]
    assert cost.padded_layer_time(spread, model).compute_us == pytest.approx(
        4 * cost.padded_layer_time(same, model).compute_us
    )


def test_topology_gpu_table(tmp_path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(
        '[cluster]\nnodes = 2\ngpus_per_node = 8\n[gpu]\ntype = "H20"\nexpert_weights = "bf16"\n'
    )
    topology = load_topology(path)
    assert topology.gpu == GPU_PRESETS["H20"] and topology.expert_weights == "bf16"
    cost = CostModel.from_topology(topology)
    assert cost.gpu.hbm_gbps == 4000 and cost.expert_weights == "bf16"
    path.write_text('[cluster]\nnodes = 2\ngpus_per_node = 8\n[gpu]\ntype = "X1"\n')
    with pytest.raises(Exception, match="not one of"):
        load_topology(path)
    path.write_text(
        '[cluster]\nnodes = 2\ngpus_per_node = 8\n[gpu]\ntype = "X1"\nhbm_gbps = 1000\n'
        "bf16_tflops = 100\nfp8_tflops = 200\n"
    )
    assert load_topology(path).gpu.hbm_gbps == 1000
