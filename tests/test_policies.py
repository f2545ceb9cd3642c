from __future__ import annotations

import numpy as np
import pytest

from scheduler.errors import ConfigError
from scheduler.placement.placement import Placement
from scheduler.policies import POLICIES, RankState, RequestInfo, make_policy


def state(running: list[int], capacity: int = 2, per_node: int = 2, queued=None) -> RankState:
    run = np.array(running, dtype=np.int64)
    q = np.zeros_like(run) if queued is None else np.array(queued, dtype=np.int64)
    return RankState(run, q, capacity, per_node)


def req(cls: str | None = None, hist: np.ndarray | None = None) -> RequestInfo:
    return RequestInfo("r", cls, hist, 3)


def two_node_placement() -> Placement:
    """1 layer, 4 experts on 2 nodes x 2 GPUs: experts 0, 1 on node 0; 2, 3 on node 1."""
    return Placement(np.array([[0, 1, 2, 3]]), num_experts=4, num_gpus=4, gpus_per_node=2)


def test_registry_and_unknown_name():
    assert set(POLICIES) == {
        "round_robin",
        "total_requests",
        "class_affinity",
        "locality_band",
        "locality_window",
    }
    with pytest.raises(ConfigError, match="round_robin, total_requests"):
        make_policy("nope")
    with pytest.raises(ConfigError, match="class_affinity"):
        make_policy("class_affinity")  # missing class_to_node_share
    with pytest.raises(ConfigError, match="band"):
        make_policy("locality_band", placement=two_node_placement(), band=2.0)


def test_round_robin_skips_full_ranks_and_returns_none_when_full():
    policy = make_policy("round_robin")
    assert [policy.choose_rank(req(), state([0, 0, 0, 0])) for _ in range(5)] == [0, 1, 2, 3, 0]
    assert policy.choose_rank(req(), state([0, 2, 2, 0])) == 3  # next was 1, full
    assert policy.choose_rank(req(), state([2, 2, 2, 2])) is None


def test_total_requests_counts_running_and_waiting():
    policy = make_policy("total_requests")
    assert policy.choose_rank(req(), state([1, 0, 1, 1], queued=[0, 3, 0, 0])) == 0
    assert policy.choose_rank(req(), state([2, 1, 1, 1], capacity=2)) == 1  # lowest on ties
    assert policy.choose_rank(req(), state([2, 2, 2, 2])) is None


def test_class_affinity_follows_shares_then_spills():
    shares = {"a": [0.75, 0.25], "b": [0.0, 1.0]}
    policy = make_policy("class_affinity", class_to_node_share=shares)
    nodes = [policy.choose_rank(req("a"), state([0, 0, 0, 0], capacity=9)) // 2 for _ in range(8)]
    assert nodes.count(0) == 6 and nodes.count(1) == 2  # weighted round-robin, exactly
    assert policy.choose_rank(req("b"), state([0, 0, 1, 0])) == 3  # least-loaded on node 1
    assert policy.choose_rank(req("b"), state([1, 0, 2, 2])) == 1  # node 1 full: spill
    assert policy.choose_rank(req(None), state([1, 1, 0, 1])) == 2  # unknown class
    assert policy.choose_rank(req("b"), state([2, 2, 2, 2])) is None
    again = make_policy("class_affinity", class_to_node_share=shares)
    nodes2 = [again.choose_rank(req("a"), state([0, 0, 0, 0], capacity=9)) // 2 for _ in range(8)]
    assert nodes2 == nodes  # deterministic


def test_locality_band_picks_the_best_node_within_band():
    policy = make_policy("locality_band", placement=two_node_placement(), band=0.1)
    on_node1 = np.array([[0, 1, 5, 4]])  # 90% of pairs on node 1
    assert policy.choose_rank(req(hist=on_node1), state([0, 0, 1, 0])) == 3
    even = np.array([[1, 1, 1, 1]])  # both nodes in the band: least-loaded anywhere
    assert policy.choose_rank(req(hist=even), state([1, 0, 1, 1])) == 1
    assert policy.choose_rank(req(hist=on_node1), state([0, 1, 2, 2])) == 0  # band full: spill
    assert policy.choose_rank(req(), state([1, 1, 0, 1])) == 2  # no histogram
    assert policy.choose_rank(req(hist=on_node1), state([2, 2, 2, 2])) is None
    wide = make_policy("locality_band", placement=two_node_placement(), band=0.95)
    assert wide.choose_rank(req(hist=on_node1), state([1, 0, 1, 1])) == 1


def test_rank_state_validates():
    with pytest.raises(ValueError):
        state([0, 0, 0], per_node=2)
