"""Ours: the locality_window policy's building blocks (the old node-level transport, the
load limits, water-filling) and its behaviour on small cases; the busiest-rank objective
itself: tests/test_window_bottleneck.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from scheduler.placement.placement import Placement
from scheduler.policies import RankState, RequestInfo, make_policy
from scheduler.policies.window import LocalityWindow, node_limits, solve_transport, water_fill


def state(running: list[int], capacity: int, per_node: int) -> RankState:
    run = np.array(running, dtype=np.int64)
    return RankState(run, np.zeros_like(run), capacity, per_node)


def brute_force(gain: np.ndarray, limit: np.ndarray) -> int:
    """Best total gain over every assignment of rows to columns within the limits."""
    best = None
    for nodes in itertools.product(range(gain.shape[1]), repeat=gain.shape[0]):
        if (np.bincount(nodes, minlength=limit.size) <= limit).all():
            total = int(gain[np.arange(gain.shape[0]), nodes].sum())
            best = total if best is None else max(best, total)
    assert best is not None
    return best


@pytest.mark.parametrize("seed", range(25))
def test_transport_is_optimal_against_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    requests, nodes = int(rng.integers(1, 7)), int(rng.integers(1, 4))
    gain = rng.integers(0, 6, (requests, nodes))
    if seed % 3 == 0:
        gain[1:] = gain[0]  # identical rows are merged into one supply node
    limit = rng.integers(0, requests + 1, nodes)
    limit[0] += max(0, requests - int(limit.sum()))
    chosen = solve_transport(gain, limit, np.zeros(nodes, dtype=np.int64))
    assert (np.bincount(chosen, minlength=nodes) <= limit).all()
    assert int(gain[np.arange(requests), chosen].sum()) == brute_force(gain, limit)


@pytest.mark.parametrize("seed", range(5))
def test_transport_matches_linear_sum_assignment_on_larger_cases(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    requests, nodes = 60, 4
    gain = rng.integers(0, 1000, (requests, nodes))
    limit = np.array([20, 10, 25, 15])
    chosen = solve_transport(gain, limit, np.zeros(nodes, dtype=np.int64))
    slots = np.repeat(np.arange(nodes), limit)  # one column per unit of capacity
    rows, cols = linear_sum_assignment(-gain[:, slots])
    assert int(gain[np.arange(requests), chosen].sum()) == int(gain[rows, slots[cols]].sum())


def test_ties_go_to_the_less_loaded_node() -> None:
    chosen = solve_transport(
        np.ones((1, 3), dtype=np.int64), np.array([1, 1, 1]), np.array([2, 0, 1])
    )
    assert chosen.tolist() == [1]


def test_node_limits_balance_and_always_fit_the_window() -> None:
    # 2 nodes, node 0 already loaded: a window of 4 may not all go to node 0
    limit = node_limits(np.array([6, 2]), np.array([10, 10]), 4, 0.0)
    assert limit.tolist() == [0, 4]  # ceil((8 + 4) / 2) = 6 per node
    limit = node_limits(np.array([6, 2]), np.array([10, 10]), 4, 0.5)
    assert limit.tolist() == [3, 7]  # ceil(1.5 * 12 / 2) = 9
    # capacity forces a node past its fair share: the water level rises instead
    limit = node_limits(np.array([0, 0]), np.array([1, 10]), 8, 0.0)
    assert limit.sum() >= 8 and limit.tolist() == [1, 7]


@pytest.mark.parametrize("seed", range(40))
def test_node_limits_match_their_definition(seed: int) -> None:
    """The level search against the docstring's definition, level by level."""
    rng = np.random.default_rng(seed)
    bins = int(rng.integers(1, 9))
    load = rng.integers(0, 12, bins)
    free = rng.integers(0, 6, bins) * (rng.random(bins) < 0.8)
    admit = int(rng.integers(0, int(free.sum()) + 2))
    slack = float(rng.choice([0.0, 0.1, 0.5]))
    fair = int(np.ceil((1.0 + slack) * (load.sum() + admit) / bins - 1e-9))
    top = int((load + free).max())
    room = [int(np.minimum(free, np.maximum(w - load, 0)).sum()) for w in range(top + 1)]
    water = next((w for w in range(top + 1) if room[w] >= admit), top)
    expected = np.minimum(free, np.maximum(max(fair, water) - load, 0))
    assert node_limits(load, free, admit, slack).tolist() == expected.tolist()


@pytest.mark.parametrize("seed", range(20))
def test_a_window_of_one_is_placed_as_the_general_greedy_places_it(seed: int) -> None:
    """The one-request shortcut against the general greedy, from the same state."""
    rng = np.random.default_rng(seed)
    nodes, per_node, layers, experts = 3, 2, 4, 12
    phy2log = np.stack([rng.permutation(experts) for _ in range(layers)])
    placement = Placement(phy2log, experts, nodes * per_node, per_node)
    fast, general = LocalityWindow(placement), LocalityWindow(placement)
    traffic = np.round(rng.random((nodes * per_node, layers)) * 4) if seed % 2 else 0.0
    for policy in (fast, general):  # the same state for both
        policy._traffic[:] = traffic
        policy._traffic_sum = policy._traffic.sum(axis=1).tolist()
    score = fast._scores([rng.integers(0, 3, (layers, experts)).astype(float)])[0]
    load = rng.integers(0, 4, nodes * per_node)
    limit = rng.integers(0, 2, nodes * per_node)
    limit[int(rng.integers(0, limit.size))] = 1
    assert fast._greedy([score], limit, load) == general._greedy_many([score], limit, load)
    assert np.array_equal(fast._traffic, general._traffic)
    assert fast._traffic_sum == general._traffic_sum
    assert fast._requests == general._requests


def test_water_fill_picks_least_loaded_slots_per_group() -> None:
    load = np.array([3, 1, 0, 0])
    free = np.array([2, 2, 1, 0])
    groups = np.array([0, 0, 1, 1])
    assert water_fill(load, free, groups, np.array([3, 1])).tolist() == [1, 1, 0, 2]


def placement_2x2() -> Placement:
    """1 layer, 4 experts on 2 nodes x 2 GPUs: experts 0, 1 on node 0; 2, 3 on node 1."""
    return Placement(np.array([[0, 1, 2, 3]]), num_experts=4, num_gpus=4, gpus_per_node=2)


def test_a_window_of_one_takes_the_cheapest_rank() -> None:
    """Against brute force over the ranks: the increase of the per-layer busiest rank's
    predicted remote pairs, weighted by balance, plus (1 - balance) x the request's own."""
    rng = np.random.default_rng(7)
    for balance in (0.0, 0.5, 1.0):
        policy = LocalityWindow(placement_2x2(), balance=balance)
        for step in range(30):
            hist = rng.integers(0, 5, (1, 4)).astype(float)
            ranks = state([0, 0, 0, 0], capacity=100, per_node=2)
            before = policy.predicted_traffic()
            remote = policy.node_remote(hist)
            costs = []
            for r in range(4):
                after = before.copy()
                after[r] += remote[r // 2]
                rise = after.max(axis=0).sum() - before.max(axis=0).sum()
                costs.append(balance * rise + (1 - balance) * remote[r // 2].sum())
            rank = policy.choose_rank(RequestInfo(str(step), None, hist, 1), ranks)
            assert rank is not None
            assert costs[rank] == pytest.approx(min(costs))


def test_window_of_one_and_fallbacks() -> None:
    policy = make_policy("locality_window", placement=placement_2x2())
    on_node1 = RequestInfo("a", None, np.array([[0, 1, 5, 4]]), 3)
    assert policy.choose_rank(on_node1, state([0, 0, 1, 0], 2, 2)) == 3
    assert policy.choose_rank(on_node1, state([0, 0, 2, 2], 2, 2)) == 0  # node 1 full
    assert policy.choose_rank(RequestInfo("b"), state([1, 1, 0, 1], 2, 2)) == 2  # no histogram
    assert policy.choose_rank(on_node1, state([2, 2, 2, 2], 2, 2)) is None
    # a uniform histogram goes to the less-loaded node
    even = RequestInfo("c", None, np.array([[1, 1, 1, 1]]), 3)
    assert policy.choose_rank(even, state([1, 1, 0, 1], 2, 2)) == 2


def test_the_load_cap_bounds_a_one_sided_window() -> None:
    policy = make_policy("locality_window", placement=placement_2x2())
    hist = np.array([[0, 0, 3, 3]])  # every request prefers node 1
    requests = [RequestInfo(str(i), None, hist, 1) for i in range(8)]
    chosen = policy.choose_ranks(requests, state([0, 0, 0, 0], 8, 2))
    per_rank = np.bincount(np.array(chosen), minlength=4)
    assert per_rank.tolist() == [1, 1, 3, 3]  # ceil(1.1 * 8 / 4) = 3 per rank
    again = make_policy("locality_window", placement=placement_2x2())
    assert again.choose_ranks(requests, state([0, 0, 0, 0], 8, 2)) == chosen  # deterministic


def test_rejects_bad_inputs() -> None:
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="balance"):
            LocalityWindow(placement_2x2(), balance=bad)
    policy = LocalityWindow(placement_2x2())
    with pytest.raises(ValueError, match="cells"):
        policy.choose_ranks([RequestInfo("x", None, np.ones((2, 4)), 1)], state([0] * 4, 2, 2))
    with pytest.raises(ValueError, match="GPUs"):
        policy.choose_ranks([RequestInfo("x")], state([0] * 4, 2, 1))


def test_finished_requests_leave_the_score_cache() -> None:
    from scheduler.emulator.expert_location import trivial_location
    from scheduler.model_shape import PRESETS
    from scheduler.policies import RankState, RequestInfo, make_policy

    model = PRESETS["deepseek-v2-lite"]
    policy = make_policy("locality_window", placement=trivial_location(model, 4, 2))
    ranks = RankState(np.zeros(4, np.int64), np.zeros(4, np.int64), 1000, 2)
    for i in range(50):
        hist = np.ones((model.num_moe_layers, model.num_experts))
        request = RequestInfo(str(i), None, hist, 10)
        rank = policy.choose_rank(request, ranks)
        assert rank is not None
        policy.on_finish(request, rank)
    assert len(policy._cache) == 0  # type: ignore[attr-defined]
    assert not policy._placed  # type: ignore[attr-defined]
    assert not policy.predicted_traffic().any()  # type: ignore[attr-defined]
