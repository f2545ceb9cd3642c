"""Peer placement methods: invariants on random instances and each method's own rules."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from scheduler.errors import ConfigError
from scheduler.model_shape import ModelShape
from scheduler.placement.methods import get_method
from scheduler.placement.methods.eplb import (
    _std_sort_desc,
    rebalance_experts,
    replicate_experts,
)
from scheduler.placement.methods.moetuner import assign_clusters, pair_cost
from scheduler.placement.methods.paper_a import _expert_cost
from scheduler.placement.methods.paper_b import group_classes
from scheduler.placement.metrics import predicted_metrics
from scheduler.placement.problem import PlacementProblem
from scheduler.placement.topology import Topology
from scheduler.profile import ClassProfile, WorkloadProfile

PEERS = ["eplb", "eplb-hierarchical", "paper-a", "moetuner", "paper-b"]


def make_problem(
    demand: np.ndarray,
    nodes: int,
    gpus_per_node: int,
    redundant: int = 0,
    name: str = "toy",
    time_limit_s: float = 5.0,
    seed: int = 0,
    balance_tolerance: float = 0.10,
) -> PlacementProblem:
    """demand [classes, layers, experts] -> a problem over a toy model with classes c0..."""
    classes, layers, experts = demand.shape
    model = ModelShape(name, layers + 1, tuple(range(1, layers + 1)), experts, 2, 16)
    total = demand.sum()
    profile = WorkloadProfile(
        model,
        {
            f"c{i}": ClassProfile(float(demand[i].sum() / total), {"decode": demand[i]})
            for i in range(classes)
        },
    )
    return PlacementProblem(
        profile,
        Topology(nodes, gpus_per_node),
        redundant,
        balance_tolerance=balance_tolerance,
        time_limit_s=time_limit_s,
        seed=seed,
    )


def skewed_demand(rng: np.random.Generator, classes: int, layers: int, experts: int) -> np.ndarray:
    """Heavy-tailed token counts, each class with its own hot experts."""
    return np.rint(rng.lognormal(3.0, 1.2, size=(classes, layers, experts))) + 1.0


def gpu_balancedness(problem: PlacementProblem, method: str) -> float:
    result = get_method(method)(problem)
    metrics = predicted_metrics(
        problem.demand,
        problem.weights,
        problem.profile.model,
        result.placement,
        result.class_to_node_share,
        problem.topology,
    )
    return float(metrics["balancedness_mean"])


# --------------------------------------------------------------------------- every peer

INSTANCES = [  # classes, layers, experts, nodes, gpus per node, redundant
    (1, 2, 8, 2, 2, 0),
    (3, 2, 12, 2, 2, 4),
    (2, 3, 16, 4, 1, 4),
    (5, 2, 12, 3, 2, 6),
]


@pytest.mark.parametrize("method", PEERS)
def test_peer_invariants_on_random_instances(method):
    rng = np.random.default_rng(7)
    for classes, layers, experts, nodes, gpn, red in INSTANCES:
        demand = skewed_demand(rng, classes, layers, experts)
        problem = make_problem(demand, nodes, gpn, red, time_limit_s=1.0)
        result = get_method(method)(problem)
        p = result.placement  # Placement itself rejects a missing expert or unequal slots
        assert result.method == method
        assert p.phy2log.shape == (layers, experts + red)
        assert (p.num_gpus, p.gpus_per_node, p.num_experts) == (nodes * gpn, gpn, experts)
        assert (p.replica_counts() >= 1).all()
        shares = result.class_to_node_share
        assert shares.shape == (classes, nodes) and (shares >= 0).all()
        np.testing.assert_allclose(shares.sum(axis=1), 1.0)
        assert result.solve_seconds >= 0 and result.status
        if result.objective is not None and result.bound is not None:
            assert result.bound <= result.objective + 1e-6 * max(1.0, abs(result.objective))


@pytest.mark.parametrize("method", ["paper-a", "moetuner", "paper-b"])
def test_peer_is_deterministic(method):
    demand = skewed_demand(np.random.default_rng(3), 3, 2, 8)
    first = get_method(method)(make_problem(demand, 2, 2, 4, seed=5))
    again = get_method(method)(make_problem(demand, 2, 2, 4, seed=5))
    np.testing.assert_array_equal(first.placement.phy2log, again.placement.phy2log)


# --------------------------------------------------------------------------- EPLB


def test_std_sort_emulation_matches_torch_tie_order():
    """Pinned from torch 2.13 CPU ``sort(descending=True)`` (libstdc++ introsort)."""
    assert _std_sort_desc([0.0] * 32) == [16, *range(31, 16, -1), 0, *range(15, 0, -1)]
    assert _std_sort_desc([float(i % 3) for i in range(40)]) == [
        29,
        20,
        17,
        23,
        14,
        26,
        11,
        8,
        32,
        5,
        35,
        2,
        38,
        31,
        1,
        34,
        28,
        25,
        37,
        22,
        16,
        13,
        4,
        10,
        19,
        7,
        30,
        39,
        0,
        3,
        36,
        6,
        33,
        9,
        12,
        27,
        15,
        24,
        18,
        21,
    ]
    values = np.random.default_rng(0).random(100).tolist()
    assert _std_sort_desc(values) == np.argsort(values)[::-1].tolist()


def test_eplb_replicas_are_min_max():
    weight = np.random.default_rng(1).integers(1, 1000, size=(6, 16)).astype(np.float32)
    phy2log, rank, logcnt = replicate_experts(weight, 28)
    assert (logcnt.sum(axis=1) == 28).all() and (logcnt >= 1).all()
    per_replica = weight / logcnt
    # Water-filling: taking a replica from any expert would make it the worst one.
    for layer, e in zip(*np.nonzero(logcnt > 1), strict=True):
        assert weight[layer, e] / (logcnt[layer, e] - 1) >= per_replica[layer].max()
    for layer in range(6):
        for e in range(16):
            ranks = rank[layer][phy2log[layer] == e]
            assert sorted(ranks.tolist()) == list(range(logcnt[layer, e]))


def test_eplb_maps_agree_and_hierarchical_keeps_groups_on_a_node():
    weight = np.random.default_rng(2).integers(0, 50, size=(4, 32)).astype(np.float64)
    phy2log, log2phy, logcnt = rebalance_experts(weight, 32, 8, 4, 16)  # hierarchical
    for layer, e in itertools.product(range(4), range(32)):
        slots = log2phy[layer, e]
        assert (slots[logcnt[layer, e] :] == -1).all()
        assert (phy2log[layer, slots[: logcnt[layer, e]]] == e).all()
    node_of = np.arange(32) // 8
    for layer in range(4):
        for group in range(8):  # no redundancy: each group of 4 experts on one node
            members = np.arange(group * 4, group * 4 + 4)
            hosts = {int(node_of[np.flatnonzero(phy2log[layer] == e)[0]]) for e in members}
            assert len(hosts) == 1


def test_eplb_rejects_impossible_shapes():
    weight = np.ones((2, 16))
    with pytest.raises(ConfigError, match="cannot hold 16 experts"):
        rebalance_experts(weight, 8, 4, 2, 4)
    with pytest.raises(ConfigError, match="do not split equally over 3 GPUs"):
        rebalance_experts(weight, 16, 4, 1, 3)
    with pytest.raises(ConfigError, match="4 expert groups do not split over 3 nodes"):
        rebalance_experts(weight, 18, 4, 3, 6, hierarchical=True)
    assert rebalance_experts(weight, 18, 4, 3, 6)[0].shape == (2, 18)  # auto: global


def test_eplb_balances_at_least_as_well_as_trivial():
    rng = np.random.default_rng(4)
    for red in (0, 4):
        problem = make_problem(skewed_demand(rng, 1, 4, 16), 2, 2, red)
        trivial = gpu_balancedness(problem, "trivial")
        assert gpu_balancedness(problem, "eplb") >= trivial
    problem = make_problem(skewed_demand(rng, 1, 4, 16), 2, 2, 0)
    assert gpu_balancedness(problem, "eplb-hierarchical") >= gpu_balancedness(problem, "trivial")


def test_eplb_hierarchical_falls_back_to_global_when_groups_do_not_split():
    demand = skewed_demand(np.random.default_rng(5), 1, 2, 24)
    result = get_method("eplb-hierarchical")(make_problem(demand, 3, 2))  # 8 groups, 3 nodes
    assert result.details["policy"] == "global" and "fallback" in result.details
    ok = get_method("eplb-hierarchical")(make_problem(demand, 2, 2))
    assert ok.details["policy"] == "hierarchical" and ok.details["num_groups"] == 8
    glob = get_method("eplb")(make_problem(demand, 3, 2))
    np.testing.assert_array_equal(glob.placement.phy2log, result.placement.phy2log)


# --------------------------------------------------------------------------- paper A


def test_paper_a_matches_brute_force_on_a_tiny_instance():
    """4 experts + 2 redundant on 2 nodes x 1 GPU, skewed link costs: every placement
    of the EPLB replica counts, scored by A's objective, against the solver."""
    demand = np.array([[[40.0, 30.0, 10.0, 5.0]]])
    problem = make_problem(demand, 2, 1, 2, balance_tolerance=10.0)
    result = get_method("paper-a")(problem)
    counts = result.placement.replica_counts()[0]
    cost = problem.topology.link_cost
    best = np.inf
    items = np.repeat(np.arange(4), counts)
    for first in itertools.combinations(range(len(items)), 3):
        per_node = np.zeros((4, 2), dtype=np.int64)
        for i in range(len(items)):
            per_node[items[i], 0 if i in first else 1] += 1
        if (per_node > 1).any():  # one copy per GPU
            continue
        best = min(best, float((demand[0, 0] / 2) @ _expert_cost(per_node, cost)))
    assert result.status == "OPTIMAL"
    assert result.objective == pytest.approx(best)
    assert result.bound == pytest.approx(best)
    # The two replicated experts (0 and 1) sit on both nodes: nothing of theirs is remote.
    assert (result.placement.replicas_per_node()[0, :2] == 1).all()


# --------------------------------------------------------------------------- MoETuner


def test_moetuner_balances_better_than_trivial():
    rng = np.random.default_rng(6)
    problem = make_problem(skewed_demand(rng, 2, 3, 12), 2, 2, 0)
    result = get_method("moetuner")(problem)
    assert result.status == "OPTIMAL" and result.objective == pytest.approx(result.bound)
    assert gpu_balancedness(problem, "moetuner") > gpu_balancedness(problem, "trivial")
    assert "proxy" in result.details["ilp2_transitions"]


def test_moetuner_ilp2_is_an_exact_bottleneck_assignment():
    rng = np.random.default_rng(8)
    traffic = rng.random((4, 4))
    pair = pair_cost(Topology(2, 2, intra_node_gbps=400.0, inter_node_gbps=50.0))
    assert pair[0, 1] == 1 / 400 and pair[0, 2] == 1 / 50 and pair[3, 3] == 0
    gpu_of, top = assign_clusters(traffic, pair)

    def worst(assign: tuple[int, ...]) -> float:
        return max(traffic[a, k] * pair[a, b] for k, b in enumerate(assign) for a in range(4))

    assert sorted(gpu_of.tolist()) == [0, 1, 2, 3]
    brute = min(worst(p) for p in itertools.permutations(range(4)))
    assert worst(tuple(gpu_of.tolist())) == pytest.approx(brute)
    assert top == pytest.approx(brute, rel=1e-6)


# --------------------------------------------------------------------------- paper B


def test_paper_b_group_mapping_for_fewer_equal_and_more_classes():
    demand = np.ones((2, 1, 4))
    share, rule = group_classes(demand, np.array([0.7, 0.3]), 4)
    assert rule == "split"
    np.testing.assert_allclose(share, [[1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 0, 1]])
    share, rule = group_classes(np.ones((3, 1, 4)), np.full(3, 1 / 3), 3)
    assert rule == "one-to-one" and (share == np.eye(3)).all()
    # Four classes, two pairs with the same hot experts -> two meta-clusters of a pair.
    hot = np.full((4, 2, 8), 1.0)
    hot[[0, 1], :, 0] = hot[[2, 3], :, 5] = 50.0
    hot[1] += 0.5
    share, rule = group_classes(hot, np.full(4, 0.25), 2)
    assert rule == "meta-kmeans"
    assert (share.argmax(axis=1)[[0, 1]] != share.argmax(axis=1)[[2, 3]]).all()
    assert share.argmax(axis=1)[0] == share.argmax(axis=1)[1]


def test_paper_b_places_each_groups_hot_experts_on_its_node():
    demand = np.full((2, 2, 8), 1.0)
    demand[0, :, [1, 2]] = 100.0  # class c0 loves experts 1 and 2
    demand[1, :, [5, 6]] = 100.0
    problem = make_problem(demand, 2, 2, 4)
    result = get_method("paper-b")(problem)
    assert result.details["group_mapping"] == "one-to-one"
    np.testing.assert_array_equal(result.class_to_node_share, np.eye(2))
    nodes = result.placement.replicas_per_node()  # [layers, experts, nodes]
    assert (nodes[:, [1, 2], 0] == 1).all() and (nodes[:, [5, 6], 1] == 1).all()
    # Stage 1: every expert once, 4 unique per node; stage 2: 2 redundant per node.
    assert (nodes.sum(axis=1) == 6).all() and (nodes <= 1).all()
    assert result.objective is not None and result.objective < demand.sum()
