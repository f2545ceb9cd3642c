"""Ours: locality_window against the busiest rank.

The policy places a window's requests on ranks so that the per-layer busiest rank's
predicted inter-node (token, expert) pairs stay low, remembering what runs where. These
tests compare it with the objective it had before (maximum mean locality, node by node,
kept as :func:`solve_transport`), and check the running-request memory, the load cap,
FIFO admission, determinism and the requests without a histogram.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scheduler.placement.placement import Placement
from scheduler.policies import RankState, RequestInfo, make_policy
from scheduler.policies.window import (
    GAIN_STEPS,
    LOAD_SLACK,
    LocalityWindow,
    node_limits,
    solve_transport,
    water_fill,
)


def state(running: list[int], capacity: int, per_node: int) -> RankState:
    run = np.array(running, dtype=np.int64)
    return RankState(run, np.zeros_like(run), capacity, per_node)


def placement_2x2() -> Placement:
    """1 layer, 4 experts on 2 nodes x 2 GPUs: experts 0, 1 on node 0; 2, 3 on node 1."""
    return Placement(np.array([[0, 1, 2, 3]]), num_experts=4, num_gpus=4, gpus_per_node=2)


def random_placement(rng: np.random.Generator, layers: int, experts: int, nodes: int, gpus: int):
    perm = np.array([rng.permutation(experts) for _ in range(layers)])
    return Placement(perm, experts, nodes * gpus, gpus)


def remote_of(placement: Placement, hist: np.ndarray) -> np.ndarray:
    """[nodes, layers] remote pairs, straight from replicas_per_node (the definition)."""
    absent = placement.replicas_per_node() == 0  # [layers, experts, nodes]
    return np.einsum("le,len->nl", hist, absent.astype(float))


def per_token(hist: np.ndarray) -> np.ndarray:
    """What the policy scores (weight "decode"): the histogram scaled to one token, its
    cells summing to the number of layers."""
    return hist * (hist.shape[0] / hist.sum())


def busiest(traffic: np.ndarray) -> float:
    """Sum over layers of the busiest rank's predicted remote pairs."""
    return float(traffic.max(axis=0).sum())


def old_assignment(placement: Placement, hists: list[np.ndarray], ranks: RankState) -> list[int]:
    """What locality_window chose before: nodes by maximum total gain within the node
    limits (slack 0.1, exact min-cost flow), then the least-loaded ranks of each node."""
    per_node = ranks.gpus_per_node
    nodes = ranks.num_nodes
    present = placement.node_presence()
    gains = np.stack([h.ravel() @ present for h in hists])
    steps = np.rint(gains * (GAIN_STEPS / gains.max())).astype(np.int64)
    free = np.maximum(ranks.capacity - ranks.running, 0)
    load = ranks.load()
    limit = node_limits(
        load.reshape(nodes, per_node).sum(1), free.reshape(nodes, per_node).sum(1), len(hists), 0.1
    )
    tiebreak = np.argsort(np.argsort(load.reshape(nodes, per_node).sum(1), kind="stable"))
    node = solve_transport(steps, limit, tiebreak)
    picked = water_fill(
        load, free, np.arange(ranks.num_ranks) // per_node, np.bincount(node, minlength=nodes)
    )
    rank_of = np.empty(len(hists), dtype=np.int64)
    rank_of[np.argsort(node, kind="stable")] = picked
    return rank_of.tolist()


def traffic_of(placement: Placement, hists: list[np.ndarray], chosen: list[int]) -> np.ndarray:
    out = np.zeros((placement.num_gpus, placement.num_layers))
    for h, r in zip(hists, chosen, strict=True):
        out[r] += remote_of(placement, h)[r // placement.gpus_per_node]
    return out


# ---------------------------------------------------------------- (a) the objective


def test_mean_locality_raises_the_busiest_rank_and_ours_does_not() -> None:
    """8 requests, each a little more local on node 1 (10 remote pairs) than on node 0
    (11). The old objective sends 5 to node 1 (its balance limit): 3 on one rank, 30
    remote pairs. Ours spreads them 2 per rank: 22 on the busiest rank, for 1 more remote
    pair in total."""
    placement = placement_2x2()
    hist = np.array([[5.0, 5.0, 6.0, 5.0]])
    hists = [hist] * 8
    ranks = state([0, 0, 0, 0], capacity=8, per_node=2)
    old = old_assignment(placement, hists, ranks)
    old_traffic = traffic_of(placement, hists, old)
    assert np.bincount(np.array(old) // 2, minlength=2).tolist() == [3, 5]
    assert busiest(old_traffic) == 30
    assert old_traffic.sum() == 83

    # weight "prefill": a request weighs its 21 prompt tokens, the histogram's own counts
    policy = make_policy("locality_window", placement=placement, weight="prefill")
    requests = [RequestInfo(str(i), None, hist, 21) for i in range(8)]
    ours = policy.choose_ranks(requests, ranks)
    ours_traffic = traffic_of(placement, hists, ours)  # type: ignore[arg-type]
    assert np.bincount(np.array(ours), minlength=4).tolist() == [2, 2, 2, 2]
    assert busiest(ours_traffic) == 22 < busiest(old_traffic)
    assert ours_traffic.sum() == 84
    assert np.allclose(policy.predicted_traffic(), ours_traffic)  # type: ignore[attr-defined]

    # balance = 0 is the mean-locality end of the knob: node 1 up to the ranks' load cap
    # (ceil(1.1 x 8 / 4) = 3 each)
    locality = make_policy("locality_window", placement=placement, balance=0.0, weight="prefill")
    chosen = locality.choose_ranks(requests, ranks)
    assert np.bincount(np.array(chosen), minlength=4).tolist() == [1, 1, 3, 3]
    assert traffic_of(placement, hists, chosen).sum() == 82  # type: ignore[arg-type]


def test_the_per_layer_max_counts_not_the_rank_total() -> None:
    """Two layers, every request as remote on either node: two requests heavy in layer 0
    and two heavy in layer 1, two per rank. Pairing alike ones gives each rank the same
    total as mixing them, but a busiest rank of 8 pairs in both layers instead of 4.5."""
    # 2 layers x 4 experts, 2 nodes x 1 GPU: experts 0, 1 on node 0; 2, 3 on node 1
    placement = Placement(np.array([[0, 1, 2, 3], [0, 1, 2, 3]]), 4, 2, 1)
    a = np.array([[4.0, 0.0, 4.0, 0.0], [0.5, 0.0, 0.5, 0.0]])  # remote (4, 0.5) anywhere
    b = a[::-1].copy()  # remote (0.5, 4)
    hists = [a, a.copy(), b, b.copy()]
    policy = make_policy("locality_window", placement=placement)
    requests = [RequestInfo(str(i), None, h, 1) for i, h in enumerate(hists)]
    chosen = policy.choose_ranks(requests, state([0, 0], capacity=2, per_node=1))
    assert chosen[0] != chosen[1] and chosen[2] != chosen[3]
    assert busiest(traffic_of(placement, hists, chosen)) == 9  # type: ignore[arg-type]
    assert busiest(traffic_of(placement, hists, [0, 0, 1, 1])) == 16


@pytest.mark.parametrize("seed", range(6))
def test_ours_is_no_worse_than_the_old_objective_at_the_busiest_rank(seed: int) -> None:
    """Random placements and per-token histograms, a window into an empty cluster: at
    the default knob the busiest rank's predicted pairs never exceed the old
    assignment's by more than 2 % (a greedy heuristic, checked on these cases; at
    ``balance = 1`` the greedy is myopic and loses by up to 4 % on two of them)."""
    rng = np.random.default_rng(seed)
    placement = random_placement(rng, 6, 16, 4, 2)
    hists = [per_token(rng.gamma(0.3, 5.0, (6, 16))) for _ in range(40)]
    ranks = state([0] * 8, capacity=8, per_node=2)
    old = traffic_of(placement, hists, old_assignment(placement, hists, ranks))
    policy = make_policy("locality_window", placement=placement)
    chosen = policy.choose_ranks(
        [RequestInfo(str(i), None, h, 1) for i, h in enumerate(hists)], ranks
    )
    ours = traffic_of(placement, hists, chosen)  # type: ignore[arg-type]
    assert busiest(ours) <= 1.02 * busiest(old)


def test_remote_vectors_follow_replicas_per_node() -> None:
    rng = np.random.default_rng(3)
    placement = random_placement(rng, 5, 12, 3, 2)
    policy = LocalityWindow(placement)
    hist = rng.integers(0, 7, (5, 12)).astype(float)
    assert np.allclose(policy.node_remote(hist), remote_of(placement, per_token(hist)))


# ---------------------------------------------------------------- (b) running requests


def test_a_rank_heavy_in_remote_traffic_receives_less() -> None:
    placement = placement_2x2()
    # weight "prefill": 20 and 4 prompt tokens, 10 and 2 remote pairs on either node
    heavy = RequestInfo("heavy", None, np.array([[10.0, 0.0, 10.0, 0.0]]), 20)
    light = [RequestInfo(f"l{i}", None, np.array([[2.0, 0.0, 2.0, 0.0]]), 4) for i in range(7)]
    ranks = state([1, 1, 1, 1], capacity=4, per_node=2)  # request counts alike everywhere

    policy = make_policy("locality_window", placement=placement, weight="prefill")
    hot = policy.choose_rank(heavy, state([0, 0, 0, 0], 4, 2))
    assert hot is not None
    chosen = policy.choose_ranks(light, ranks)
    assert chosen.count(hot) == 0
    assert policy.predicted_traffic()[hot].sum() == 10  # type: ignore[attr-defined]

    fresh = make_policy("locality_window", placement=placement, weight="prefill")
    assert fresh.choose_ranks(light, ranks).count(hot) >= 1  # without the memory it would

    policy.on_finish(heavy, hot)  # forgotten: the rank takes its share again
    for request, rank in zip(light, chosen, strict=True):
        policy.on_finish(request, rank)  # type: ignore[arg-type]
    assert not policy.predicted_traffic().any()  # type: ignore[attr-defined]
    again = make_policy("locality_window", placement=placement, weight="prefill")
    assert policy.choose_ranks(light, ranks) == again.choose_ranks(light, ranks)


def test_the_same_request_id_placed_twice_is_forgotten_once_per_finish() -> None:
    """The steady-state simulator draws requests with replacement: one id may run twice."""
    policy = make_policy("locality_window", placement=placement_2x2(), weight="prefill")
    request = RequestInfo("r", None, np.array([[3.0, 0.0, 3.0, 0.0]]), 6)
    first = policy.choose_rank(request, state([0, 0, 0, 0], 4, 2))
    second = policy.choose_rank(request, state([1 if r == first else 0 for r in range(4)], 4, 2))
    assert first is not None and second is not None and first != second
    policy.on_finish(request, second)
    traffic = policy.predicted_traffic()  # type: ignore[attr-defined]
    assert traffic[first].sum() == 3 and traffic.sum() == 3
    policy.on_finish(request, first)
    policy.on_finish(request, first)  # unknown by now: ignored
    policy.on_finish(RequestInfo("never-placed"), 0)
    assert not policy.predicted_traffic().any()  # type: ignore[attr-defined]


# ---------------------------------------------------------------- (c) the contract


@pytest.mark.parametrize("seed", range(8))
def test_capacity_load_cap_fifo_and_determinism(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    placement = random_placement(rng, 4, 8, 2, 2)
    capacity = 5
    policies = [make_policy("locality_window", placement=placement) for _ in range(2)]
    answers: list[list[list[int | None]]] = [[], []]
    for _ in range(6):
        running = rng.integers(0, capacity + 1, 4)
        ranks = state(running.tolist(), capacity, 2)
        count = int(rng.integers(1, 15))
        requests = [
            RequestInfo(f"{_}-{i}", None, rng.integers(0, 6, (4, 8)).astype(float), 1)
            for i in range(count)
        ]
        for k, policy in enumerate(policies):
            chosen = policy.choose_ranks(requests, ranks)
            answers[k].append(chosen)
        free = int((capacity - running).sum())
        admitted = min(count, free)
        assert all(c is not None for c in chosen[:admitted])  # the oldest are admitted
        assert all(c is None for c in chosen[admitted:])
        taken = np.bincount([c for c in chosen if c is not None], minlength=4)
        assert (running + taken <= capacity).all()
        limit = node_limits(ranks.load(), capacity - running, admitted, LOAD_SLACK)
        assert (taken <= limit).all()
    assert answers[0] == answers[1]  # deterministic


def test_the_load_cap_yields_to_capacity() -> None:
    """A window larger than the fair share fits: the level rises to the water line."""
    policy = make_policy("locality_window", placement=placement_2x2())
    hist = np.array([[0.0, 0.0, 3.0, 3.0]])
    chosen = policy.choose_ranks(
        [RequestInfo(str(i), None, hist, 1) for i in range(6)], state([0, 2, 2, 2], 3, 2)
    )
    assert sorted(chosen) == [0, 0, 0, 1, 2, 3]  # type: ignore[type-var]


def test_a_full_cluster_queues_everyone() -> None:
    policy = make_policy("locality_window", placement=placement_2x2())
    request = RequestInfo("x", None, np.ones((1, 4)), 1)
    assert policy.choose_ranks([request, request], state([2, 2, 2, 2], 2, 2)) == [None, None]
    assert not policy.predicted_traffic().any()  # type: ignore[attr-defined]


# ---------------------------------------------------------------- (d) no histogram


def test_requests_without_a_histogram_go_to_the_least_loaded_ranks() -> None:
    policy = make_policy("locality_window", placement=placement_2x2())
    plain = [RequestInfo(f"p{i}") for i in range(3)]
    assert policy.choose_ranks(plain, state([2, 0, 1, 3], 4, 2)) == [1, 1, 2]
    assert not policy.predicted_traffic().any()  # type: ignore[attr-defined]
    # mixed: the scored request is placed first, the others fill the least-loaded ranks
    scored = RequestInfo("s", None, np.array([[0.0, 0.0, 4.0, 4.0]]), 1)
    chosen = policy.choose_ranks([plain[0], scored, plain[1]], state([0, 0, 0, 0], 4, 2))
    assert chosen[1] in (2, 3)
    assert sorted(chosen) == [0, 1, chosen[1]]  # type: ignore[type-var]
    for request, rank in zip(plain, chosen[::2], strict=False):
        policy.on_finish(request, rank)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the knob


def test_balance_reaches_the_policy_from_the_server_config(tmp_path: Path) -> None:
    from scheduler.errors import ConfigError
    from scheduler.server.cluster import load_cluster
    from scheduler.server.config import load_config
    from scheduler.server.core import build_policy
    from tests.server_harness import write_config

    path = write_config(
        tmp_path, "http://127.0.0.1:1", policy={"name": "locality_window", "balance": 0.8}
    )
    config = load_config(path)
    policy = build_policy(config, load_cluster(config))
    assert isinstance(policy, LocalityWindow) and policy.balance == 0.8
    path.write_text(path.read_text().replace("balance = 0.8", "balance = 1.5"))
    with pytest.raises(ConfigError, match="balance"):
        load_config(path)
