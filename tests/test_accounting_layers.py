"""Per-layer accounting and exact per-layer padding."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler.accounting import CostModel, account, static_dispatch_table
from scheduler.accounting.metrics import locality_codes
from scheduler.model_shape import ModelShape
from scheduler.placement.placement import Placement
from scheduler.placement.topology import Topology


def _model(layers: int, experts: int, top_k: int, hidden: int = 128) -> ModelShape:
    return ModelShape("tiny", layers, tuple(range(layers)), experts, top_k, hidden)


def _case(seed: int) -> tuple[Placement, Topology, ModelShape, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    nodes, per_node = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    gpus = nodes * per_node
    experts, layers, top_k = 6, 3, 3
    slots = gpus * int(rng.integers(2, 4))
    while slots < experts:
        slots += gpus
    phy2log = np.array(
        [
            rng.permutation(np.r_[np.arange(experts), rng.integers(0, experts, slots - experts)])
            for _ in range(layers)
        ]
    )
    placement = Placement(phy2log, experts, gpus, per_node)
    tokens = int(rng.integers(1, 30))
    ids = np.array(
        [[rng.choice(experts, top_k, replace=False) for _ in range(layers)] for _ in range(tokens)]
    )
    ids[rng.random((tokens, layers)) < 0.1] = -1
    return (
        placement,
        Topology(nodes, per_node),
        _model(layers, experts, top_k),
        rng.integers(0, gpus, tokens),
        ids,
    )


def _reference_per_layer(placement: Placement, ranks: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """[ranks, layers] node copies, token by token from the dispatch table."""
    dest = static_dispatch_table(placement)
    g = placement.gpus_per_node
    out = np.zeros((placement.num_gpus, ids.shape[1]), dtype=np.int64)
    for t, r in enumerate(ranks):
        for layer in range(ids.shape[1]):
            nodes = {int(dest[r, layer, e]) // g for e in ids[t, layer] if e >= 0}
            out[r, layer] += len(nodes - {int(r) // g})
    return out


def _reference_distinct(placement: Placement, ranks: np.ndarray, ids: np.ndarray) -> list:
    """[layers][gpus]: distinct experts each GPU is reached for, token by token."""
    dest = static_dispatch_table(placement)
    served: list[list[set[int]]] = [
        [set() for _ in range(placement.num_gpus)] for _ in range(ids.shape[1])
    ]
    for t, r in enumerate(ranks):
        for layer in range(ids.shape[1]):
            for e in ids[t, layer]:
                if e >= 0:
                    served[layer][int(dest[r, layer, e])].add(int(e))
    return [[len(cell) for cell in row] for row in served]


@pytest.mark.parametrize("seed", range(15))
def test_event_and_table_paths_agree_and_per_layer_sums(seed: int) -> None:
    placement, topology, model, ranks, ids = _case(seed)
    table = account(placement, topology, model, ranks, ids, stats="table", per_layer=True)
    events = account(placement, topology, model, ranks, ids, stats="events", per_layer=True)
    for field in ("remote_hits", "node_copies", "intra_node_copies", "token_layers"):
        assert getattr(table, field) == getattr(events, field)
    assert table.rank_remote_hits.tolist() == events.rank_remote_hits.tolist()
    assert table.gpu_load.tolist() == events.gpu_load.tolist()
    assert table.gpu_distinct_experts.tolist() == events.gpu_distinct_experts.tolist()
    assert table.gpu_distinct_experts.tolist() == _reference_distinct(placement, ranks, ids)
    assert table.rank_layer_node_copies is not None
    assert (
        table.rank_layer_node_copies.tolist()
        == _reference_per_layer(placement, ranks, ids).tolist()
    )
    assert table.rank_layer_node_copies.sum(axis=1).tolist() == table.rank_node_copies.tolist()
    assert table.rank_layer_intra_node_copies is not None
    assert (
        table.rank_layer_intra_node_copies.sum(axis=1).tolist()
        == table.rank_intra_node_copies.tolist()
    )
    plain = account(placement, topology, model, ranks, ids)
    assert plain.rank_layer_node_copies is None and plain.remote_hits == table.remote_hits


def test_precomputed_codes_give_the_same_result() -> None:
    placement, topology, model, ranks, ids = _case(3)
    dest = static_dispatch_table(placement)
    codes = locality_codes(dest, placement.gpus_per_node)
    a = account(placement, topology, model, ranks, ids, dest_gpu=dest, codes=codes)
    b = account(placement, topology, model, ranks, ids)
    assert a.node_copies == b.node_copies and a.gpu_load.tolist() == b.gpu_load.tolist()


def test_padded_layer_time_hand_computed() -> None:
    # 2 nodes x 1 GPU, expert e on GPU e % 2, 2 layers, top-1, hidden 128.
    placement = Placement(np.array([[0, 1], [0, 1]]), 2, 2, 1)
    model = _model(2, 2, 1)
    # layer 0: rank 0 sends 2 copies (2 tokens to expert 1), rank 1 none;
    # layer 1: rank 1 sends 1 copy (expert 0), rank 0 none.
    ids = np.array([[[1], [0]], [[1], [0]], [[1], [0]]])
    ranks = np.array([0, 0, 1])
    acc = account(placement, Topology(2, 1), model, ranks, ids, per_layer=True)
    assert acc.rank_layer_node_copies is not None
    assert acc.rank_layer_node_copies.tolist() == [[2, 0], [0, 1]]
    cost = CostModel()
    exact = cost.padded_layer_time(acc, model)
    size = acc.bytes_per_copy
    # per layer the busiest rank: layer 0 -> 2 copies, layer 1 -> 1 copy
    want = (cost.all_to_all_us(2 * size.dispatch) + cost.all_to_all_us(1 * size.dispatch)) / 2
    assert exact.dispatch_us == pytest.approx(want)
    # the mean over layer sums pads to max(2 + 0, 0 + 1) / 2 = 1 copy per layer: lower
    lower = cost.mean_layer_time(acc, model)
    assert lower.dispatch_us == pytest.approx(cost.all_to_all_us(1 * size.dispatch))
    assert exact.total_us > lower.total_us
    with pytest.raises(ValueError, match="per_layer"):
        cost.padded_layer_time(account(placement, Topology(2, 1), model, ranks, ids), model)


@pytest.mark.parametrize("seed", range(5))
def test_padded_is_never_below_the_mean_bound(seed: int) -> None:
    placement, topology, model, ranks, ids = _case(seed)
    acc = account(placement, topology, model, ranks, ids, per_layer=True)
    cost = CostModel()
    assert (
        cost.padded_layer_time(acc, model).total_us
        >= cost.mean_layer_time(acc, model).total_us - 1e-9
    )
