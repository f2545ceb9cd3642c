"""Ours: capacity- and balance-constrained assignment of a scheduling window to nodes that
maximises expected locality (``locality_window``; docs/policies.md).

For one window of queued requests (oldest first), the policy

1. admits the oldest ``A = min(len(window), free slots)`` requests (FIFO-fair: a younger
   request never takes the place of an older one; the rest stay queued);
2. scores each admitted request with a predicted ``expert_histogram`` against every node:
   ``gain[i, n] = sum over (layer, expert) of histogram[i] x [node n holds a replica]``,
   the expected number of the request's (token, expert) pairs served on node ``n`` (under
   SGLang's static dispatch an expert with a replica on the rank's node never leaves it);
   so a request's weight is its predicted token count;
3. solves the transportation problem "each request to one node, node ``n`` takes at most
   ``limit[n]`` requests, maximise the total gain" exactly as a min-cost flow (OR-Tools
   ``SimpleMinCostFlow``; requests with identical gain rows are merged into one supply
   node, so a class-profile predictor gives a handful of nodes whatever the window);
4. places each node's requests on its least-loaded ranks (water-filling, lowest rank on
   ties), and the requests without a histogram on the least-loaded ranks anywhere.

Balance: ``limit[n] = min(free[n], max(0, ceil(level) - load[n]))`` with ``level =
max((1 + slack) x (L + A) / N, w)``, where ``L`` is the cluster's running + queued load,
``load[n]`` the node's, ``free[n]`` its free slots, and ``w`` the smallest integer water
level at which the free slots can take all ``A`` requests (so the window is always placed:
the policy is work-conserving like SGLang's balancers). After a window no node holds more
than ``(1 + slack)`` times its fair share of the cluster's load, rounded up, unless
capacity forces it.

Gains are rounded to integers (``2**20`` steps of the window's largest gain) for the
flow solver, and ties are broken toward less-loaded nodes, so the answer is
deterministic and optimal up to rounding (less than ``admitted / 2**20`` of the largest
single gain; :func:`solve_transport`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
from ortools.graph.python import min_cost_flow

from scheduler.placement.placement import Placement
from scheduler.policies.base import RankState, RequestInfo, RoutingPolicy

#: Integer resolution of the gains handed to the flow solver.
GAIN_STEPS = 1 << 20
#: Score vectors kept per histogram object (the simulator and server reuse them).
CACHE_ENTRIES = 1 << 16


def water_fill(
    load: np.ndarray, free: np.ndarray, groups: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """Least-loaded slots: ``counts[g]`` picks among the ranks of group ``g``.

    ``load, free, groups [ranks]``: each rank's load, free slots and group (e.g. node);
    returns the chosen ranks, group by group (group 0's first), each group's in the order
    of increasing load level then rank index: rank ``r`` offers the levels ``load[r]``,
    ``load[r] + 1``, ..., ``load[r] + free[r] - 1``.
    """
    free = np.maximum(free, 0)
    total = int(free.sum())
    rank = np.repeat(np.arange(load.size), free)
    first = np.cumsum(free) - free
    level = load[rank] + (np.arange(total) - np.repeat(first, free))
    order = np.lexsort((rank, level, groups[rank]))
    sorted_rank = rank[order]
    group_free = np.bincount(groups[rank], minlength=counts.size)
    if (counts > group_free).any():
        raise ValueError("more picks than free slots in a group")
    start = np.cumsum(group_free) - group_free
    take = np.repeat(start, counts) + (
        np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    )
    return sorted_rank[take]


def node_limits(
    node_load: np.ndarray, node_free: np.ndarray, admit: int, slack: float
) -> np.ndarray:
    """[nodes] how many of ``admit`` requests each node may take (module docstring)."""
    nodes = node_load.size
    fair = int(np.ceil((1.0 + slack) * (node_load.sum() + admit) / nodes - 1e-9))
    top = int((node_load + node_free).max(initial=0))
    levels = np.arange(top + 1)[:, None]
    room = np.minimum(node_free, np.maximum(levels - node_load, 0)).sum(axis=1)
    reach = np.flatnonzero(room >= admit)
    water = int(reach[0]) if reach.size else top
    level = max(fair, water)
    return np.minimum(node_free, np.maximum(level - node_load, 0))


def solve_transport(gain: np.ndarray, limit: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Each row of ``gain [requests, nodes]`` (integers) to one node, node ``n`` taking at
    most ``limit[n]``, maximising the total gain; ``tiebreak[n]`` (small non-negative
    integers) prefers some nodes among equal gains. Returns ``[requests]`` node indices.

    Exact for ``tiebreak`` all zero: a min-cost flow with identical rows merged into one
    supply node. With a tie-break the cost is ``-gain x (max tiebreak + 1) + tiebreak``,
    so a request never gives up a gain step for a tie-break; the total may fall short of
    the optimum by less than one gain step per request.
    """
    requests, nodes = gain.shape
    if requests == 0:
        return np.zeros(0, dtype=np.int64)
    if int(limit.sum()) < requests:
        raise ValueError("node limits cannot take every request")
    rows, inverse, supply = np.unique(gain, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    groups = rows.shape[0]
    weight = int(tiebreak.max(initial=0)) + 1  # a tie-break never beats one gain step
    cost = -rows.astype(np.int64) * weight + tiebreak[None, :].astype(np.int64)
    flow = min_cost_flow.SimpleMinCostFlow()
    sink = groups + nodes
    tails = np.concatenate([np.repeat(np.arange(groups), nodes), groups + np.arange(nodes)])
    heads = np.concatenate([np.tile(groups + np.arange(nodes), groups), np.full(nodes, sink)])
    caps = np.concatenate([np.repeat(supply, nodes), limit]).astype(np.int64)
    costs = np.concatenate([cost.ravel(), np.zeros(nodes, dtype=np.int64)])
    flow.add_arcs_with_capacity_and_unit_cost(tails, heads, caps, costs)
    supplies = np.concatenate([supply, np.zeros(nodes, dtype=np.int64), [-requests]])
    flow.set_nodes_supplies(np.arange(sink + 1), supplies.astype(np.int64))
    status = flow.solve()
    if status != flow.OPTIMAL:
        raise RuntimeError(f"min-cost flow failed with status {status}")
    amounts = flow.flows(np.arange(groups * nodes)).reshape(groups, nodes)
    # Requests of group g (in window order) take its nodes in increasing node order.
    node_seq = np.repeat(np.tile(np.arange(nodes), groups), amounts.ravel())
    order = np.argsort(inverse, kind="stable")
    chosen = np.empty(requests, dtype=np.int64)
    chosen[order] = node_seq
    return chosen


class LocalityWindow(RoutingPolicy):
    """Ours: joint, capacity- and balance-constrained locality assignment of a window
    (module docstring). ``slack``: how far above its fair share of the load a node may
    go (default 0.1)."""

    name = "locality_window"

    def __init__(self, placement: Placement, slack: float = 0.1) -> None:
        if not slack >= 0:
            raise ValueError(f"slack must be >= 0, got {slack}")
        self.slack = float(slack)
        self.gpus_per_node = placement.gpus_per_node
        self.present = placement.node_presence()  # [layers * experts, nodes]
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def node_gains(self, histogram: np.ndarray) -> np.ndarray:
        """[nodes] expected (token, expert) pairs of ``histogram`` served on each node
        (cached per histogram object)."""
        key = id(histogram)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is histogram:
            self._cache.move_to_end(key)
            return hit[1]
        counts = np.asarray(histogram, dtype=np.float64).ravel()
        if counts.size != self.present.shape[0]:
            raise ValueError(
                f"expert histogram has {counts.size} cells, the placement "
                f"{self.present.shape[0]} (layers x experts)"
            )
        gains = counts @ self.present
        self._cache[key] = (histogram, gains)
        if len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return gains

    def _gains_of(self, request: RequestInfo) -> np.ndarray:
        hist = request.expert_histogram
        hit = self._cache.get(id(hist))
        if hit is not None and hit[0] is hist:
            return hit[1]
        assert hist is not None
        return self.node_gains(hist)

    def choose_rank(self, request: RequestInfo, ranks: RankState) -> int | None:
        return self.choose_ranks([request], ranks)[0]

    def on_finish(self, request: RequestInfo, rank: int) -> None:
        """A finished request's histogram is not scored again: drop it from the cache (so a
        server's per-request histograms do not pile up to CACHE_ENTRIES)."""
        hist = request.expert_histogram
        hit = self._cache.get(id(hist))
        if hit is not None and hit[0] is hist:
            del self._cache[id(hist)]

    def choose_ranks(self, requests: Sequence[RequestInfo], ranks: RankState) -> list[int | None]:
        per_node, nodes = ranks.gpus_per_node, ranks.num_nodes
        if per_node != self.gpus_per_node or nodes != self.present.shape[1]:
            raise ValueError(
                f"the placement has {self.present.shape[1]}x{self.gpus_per_node} GPUs, "
                f"the ranks {nodes}x{per_node}"
            )
        free = np.maximum(ranks.capacity - ranks.running, 0).astype(np.int64)
        load = ranks.load().astype(np.int64)
        admit = min(len(requests), int(free.sum()))
        chosen: list[int | None] = [None] * len(requests)
        if admit == 0:
            return chosen
        node_of_rank = np.arange(ranks.num_ranks) // per_node
        node_free = free.reshape(nodes, per_node).sum(axis=1)
        node_load = load.reshape(nodes, per_node).sum(axis=1)
        window = requests[:admit]
        scored = [i for i, r in enumerate(window) if r.expert_histogram is not None]
        if scored:
            gains = np.stack([self._gains_of(window[i]) for i in scored])
            top = gains.max()
            steps = np.rint(gains * (GAIN_STEPS / top)) if top > 0 else np.zeros_like(gains)
            limit = node_limits(node_load, node_free, admit, self.slack)
            tiebreak = np.argsort(np.argsort(node_load, kind="stable"), kind="stable")
            node = solve_transport(steps.astype(np.int64), limit, tiebreak)
            counts = np.bincount(node, minlength=nodes)
            picked = water_fill(load, free, node_of_rank, counts)
            rank_of = np.empty(len(scored), dtype=np.int64)
            rank_of[np.argsort(node, kind="stable")] = picked  # grouped by node, in order
            np.add.at(load, rank_of, 1)
            np.subtract.at(free, rank_of, 1)
            for i, rank in zip(scored, rank_of.tolist(), strict=True):
                chosen[i] = rank
        rest = [i for i, r in enumerate(window) if r.expert_histogram is None]
        if rest:
            anywhere = np.zeros(ranks.num_ranks, dtype=np.int64)
            picked = water_fill(load, free, anywhere, np.array([len(rest)]))
            for i, rank in zip(rest, picked.tolist(), strict=True):
                chosen[i] = rank
        return chosen
