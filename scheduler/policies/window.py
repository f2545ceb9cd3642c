"""Ours: assignment of a scheduling window to DP ranks against the busiest rank's
predicted inter-node traffic (``locality_window``; docs/policies.md).

The all-to-all kernels of every MoE layer wait for the busiest rank, so what a routing
decision should keep low is, per MoE layer, the largest number of remote (token, expert)
pairs any one rank sends, not the mean. For one window of queued requests (oldest
first) the policy

1. admits the oldest ``A = min(len(window), free slots)`` requests (FIFO-fair: a younger
   request never takes the place of an older one; the rest stay queued);
2. predicts, for each admitted request with an ``expert_histogram [layers, experts]`` and
   every node ``n``, its **remote vector** ``remote[n, l] = sum over experts e of
   histogram[l, e] x [node n holds no replica of (l, e)]``
   (``placement.replicas_per_node()``): its (token, expert) pairs that leave the node in
   MoE layer ``l`` if it runs on a rank of node ``n`` (under SGLang's static dispatch an
   expert with a replica on the rank's node is reached there). The histogram only gives
   the shape: it is scaled to one token (its cells summing to the number of MoE layers),
   then weighed by what the request puts into a step: one token per running request with
   ``weight="decode"`` (the default: a decode step holds one token of every running
   request, whatever its length), its prompt tokens with ``weight="prefill"`` (a
   prefill router: the prompt goes through in its chunks);
3. keeps, per rank and MoE layer, the **predicted traffic** ``T[r, l]``: the sum of the
   remote vectors (on the rank's node) of the requests this policy placed on ``r`` that
   have not finished (remembered by ``request_id``, forgotten in :meth:`on_finish`);
4. places the admitted requests one at a time, in decreasing order of their mean remote
   pairs over the nodes (the big ones first, while there is room to spread them), each on
   the rank ``r`` (of node ``n``) minimising

       balance x [sum_l max(M_l, T[r, l] + remote[n, l]) - sum_l M_l]
         + (1 - balance) x sum_l remote[n, l]

   with ``M_l = max_r T[r, l]``: the increase of the sum over layers of the busiest
   rank's predicted remote pairs, plus the request's own remote pairs (the mean term:
   total inter-node traffic), subject to each rank's load cap (below). Ranks of one node
   are alike for a request's traffic, so each node offers one candidate: its rank with
   the least predicted traffic ``sum_l T[r, l]`` (then fewest requests, lowest index)
   under its cap; ties between nodes go to the candidate with less predicted traffic,
   then fewer requests (a ``1e-9`` relative tie-break);
5. places the requests without a histogram on the least-loaded ranks anywhere
   (water-filling, lowest rank on ties), as before; they add no predicted traffic.

``balance`` in [0, 1] is the one knob: 1 minimises the busiest rank's predicted remote
pairs only (the mean is a tie-break), 0 the mean only (every request to its most local
rank under the cap: the old objective of this policy, greedily), 0.5 (default) counts
one remote pair on the busiest rank as much as one remote pair anywhere.

Load cap: rank ``r`` may take at most ``limit[r] = min(free[r], max(0, ceil(level) -
load[r])`` of the window with ``level = max((1 + LOAD_SLACK) x (L + A) / R, w)``, where
``L`` is the cluster's running + queued load, ``load[r]`` the rank's, ``R`` the number of
ranks and ``w`` the smallest integer level at which the free slots take all ``A``
requests: no rank goes more than 10 % above its fair share of the requests (rounded up)
unless capacity forces it, and the window is always placed (work-conserving like
SGLang's balancers).

This is a greedy heuristic for a min-max assignment problem (NP-hard in general): it is
deterministic, exact for a window of one request, and not optimal in general. Requests
placed by an earlier policy object (before a reload) are not known to this one.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ortools.graph.python import min_cost_flow
from scipy import sparse

from scheduler.placement.placement import Placement
from scheduler.policies.base import RankState, RequestInfo, RoutingPolicy

#: How far above its fair share of the requests a rank may go (module docstring).
LOAD_SLACK = 0.1
#: Default of the ``balance`` knob.
DEFAULT_BALANCE = 0.5
#: What a request weighs (module docstring): one token per step (decode), or its prompt.
WEIGHTS = ("decode", "prefill")
#: Remote vectors kept per histogram object (the simulator and server reuse them).
CACHE_ENTRIES = 1 << 16
#: Weight of the tie-break (predicted traffic, then requests) against the cost.
TIE = 1e-9
#: Integer resolution of the gains handed to :func:`solve_transport`.
GAIN_STEPS = 1 << 20


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


def node_limits(load: np.ndarray, free: np.ndarray, admit: int, slack: float) -> np.ndarray:
    """How many of ``admit`` requests each of the bins ``load, free [bins]`` (ranks, or
    nodes) may take: ``min(free, max(0, ceil(level) - load))`` with ``level = max((1 +
    slack) x (sum(load) + admit) / bins, w)``, ``w`` the lowest level that takes them all
    (module docstring)."""
    loads, frees = load.tolist(), free.tolist()
    fair = math.ceil((1.0 + slack) * (sum(loads) + admit) / len(loads) - 1e-9)
    top = max((lo + f for lo, f in zip(loads, frees, strict=True)), default=0)

    def room(level: int) -> int:
        return sum(min(f, level - lo) for lo, f in zip(loads, frees, strict=True) if level > lo)

    # the lowest level in [0, top] whose room takes all ``admit`` (room grows with the
    # level; below the least-loaded open bin's load + 1 there is none), else top
    water = top
    low = min((lo + 1 for lo, f in zip(loads, frees, strict=True) if f > 0), default=0)
    if admit <= 0:
        water = 0
    elif low <= top and room(low) >= admit:
        water = low
    elif room(top) >= admit:
        while low < water:
            mid = (low + water) // 2
            if room(mid) >= admit:
                water = mid
            else:
                low = mid + 1
    level = max(fair, water)
    return np.minimum(free, np.maximum(level - load, 0))


def solve_transport(gain: np.ndarray, limit: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Each row of ``gain [requests, nodes]`` (integers) to one node, node ``n`` taking at
    most ``limit[n]``, maximising the total gain; ``tiebreak[n]`` (small non-negative
    integers) prefers some nodes among equal gains. Returns ``[requests]`` node indices.

    The objective this policy had before it looked at the busiest rank (maximum mean
    locality at node granularity), kept as the reference it is compared against
    (``tests/test_window_bottleneck.py``). Exact for ``tiebreak`` all zero: a min-cost
    flow with identical rows merged into one supply node. With a tie-break the cost is
    ``-gain x (max tiebreak + 1) + tiebreak``, so a request never gives up a gain step for
    a tie-break; the total may fall short of the optimum by less than one gain step per
    request.
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


@dataclass(frozen=True)
class _Score:
    """One histogram against the placement. ``cost [nodes, layers + 1]``: the remote
    vector on each node, then ``(1 - balance) / balance`` x its sum (the mean term, in
    the units of the max term); ``remote [nodes]``: the remote pairs on each node;
    ``spread``: their mean (the greedy's order)."""

    histogram: np.ndarray
    cost: np.ndarray
    remote: list[float]
    spread: float


def _weighted(score: _Score, tokens: int) -> _Score:
    """``score`` for a request of ``tokens`` tokens (scores are per token)."""
    if tokens == 1:
        return score
    return _Score(
        score.histogram,
        score.cost * tokens,
        [v * tokens for v in score.remote],
        score.spread * tokens,
    )


class LocalityWindow(RoutingPolicy):
    """Ours: each window's requests to ranks against the busiest rank's predicted
    inter-node traffic (module docstring). ``balance`` in [0, 1]: the weight of the
    busiest rank's remote pairs against the mean's (default 0.5)."""

    name = "locality_window"

    def __init__(
        self, placement: Placement, balance: float = DEFAULT_BALANCE, weight: str = "decode"
    ) -> None:
        if not 0 <= balance <= 1:
            raise ValueError(f"balance must be in [0, 1], got {balance}")
        if weight not in WEIGHTS:
            raise ValueError(f"weight must be one of {', '.join(WEIGHTS)}, got {weight!r}")
        self.balance = float(balance)
        self.weight = weight
        # Costs are divided by balance: the max term keeps weight 1 (a tie-break at 0).
        self._mu = (1.0 - self.balance) / self.balance if self.balance > 0 else 1e6
        self.gpus_per_node = placement.gpus_per_node
        self.num_nodes = placement.num_nodes
        self.num_ranks = placement.num_gpus
        self.layers, self.experts = placement.num_layers, placement.num_experts
        # Sparse [layers x nodes + layers, layers x experts]: row l x nodes + n sums the
        # cells of layer l that node n holds, row layers x nodes + l all cells of layer l.
        layer, expert, node = np.nonzero(placement.replicas_per_node() > 0)
        cells = self.layers * self.experts
        self._present = sparse.csr_matrix(
            (
                np.ones(layer.size + cells),
                (
                    np.concatenate(
                        [
                            layer * self.num_nodes + node,
                            self.layers * self.num_nodes + np.arange(cells) // self.experts,
                        ]
                    ),
                    np.concatenate([layer * self.experts + expert, np.arange(cells)]),
                ),
            ),
            shape=(self.layers * (self.num_nodes + 1), cells),
        )
        self._cache: OrderedDict[int, _Score] = OrderedDict()
        # Per rank: predicted remote pairs per layer of the requests placed there (one
        # extra column, used inside a decision for the tie-break), their sum, and how
        # many remembered requests run there.
        self._traffic = np.zeros((self.num_ranks, self.layers))
        self._traffic_sum = [0.0] * self.num_ranks
        self._requests = [0] * self.num_ranks
        # request_id -> [(rank, remote vector on its node)], one entry per placement
        self._placed: dict[str, list[tuple[int, _Score]]] = {}

    # ------------------------------------------------------------------ scoring

    def node_remote(self, histogram: np.ndarray) -> np.ndarray:
        """[nodes, layers] remote (token, expert) pairs of ``histogram`` on each node
        (cached per histogram object)."""
        return self._scores([histogram])[0].cost[:, : self.layers]

    def predicted_traffic(self) -> np.ndarray:
        """[ranks, layers] predicted remote pairs of the remembered requests per rank."""
        return self._traffic.copy()

    def _scores(self, histograms: Sequence[np.ndarray]) -> list[_Score]:
        out: list[_Score | None] = []
        todo: dict[int, np.ndarray] = {}
        for hist in histograms:
            hit = self._cache.get(id(hist))
            if hit is not None and hit.histogram is hist:
                out.append(hit)
            else:
                out.append(None)
                todo[id(hist)] = hist
        for hist in todo.values():
            self._cache[id(hist)] = self._score(hist)
        if todo:
            out = [
                s if s is not None else self._cache[id(h)]
                for s, h in zip(out, histograms, strict=True)
            ]
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return out  # type: ignore[return-value]

    def _score(self, hist: np.ndarray) -> _Score:
        counts = np.asarray(hist, dtype=np.float64)
        if counts.size != self.layers * self.experts:
            raise ValueError(
                f"expert histogram has {counts.size} cells, the placement "
                f"{self.layers * self.experts} (layers x experts)"
            )
        total = float(counts.sum())
        if total > 0:  # per token: one (decode) token's pairs sum to `layers`
            counts = counts * (self.layers / total)
        layers, nodes = self.layers, self.num_nodes
        both = self._present @ counts.ravel()
        remote = both[layers * nodes :, None] - both[: layers * nodes].reshape(layers, nodes)
        np.maximum(remote, 0.0, out=remote)  # [layers, nodes]
        cost = np.empty((nodes, layers + 1))
        cost[:, :layers] = remote.T
        per_node = np.add.reduce(remote, axis=0)
        np.multiply(per_node, self._mu, out=cost[:, layers])
        remotes = per_node.tolist()
        return _Score(hist, cost, remotes, sum(remotes) / nodes)

    # ------------------------------------------------------------------ the contract

    def choose_rank(self, request: RequestInfo, ranks: RankState) -> int | None:
        return self.choose_ranks([request], ranks)[0]

    def on_finish(self, request: RequestInfo, rank: int) -> None:
        """Forget ``request``'s predicted traffic on ``rank``, and drop its histogram from
        the score cache (so a server's per-request histograms do not pile up)."""
        placed = self._placed.get(request.request_id)
        if placed is not None:
            for k, (r, score) in enumerate(placed):
                if r == rank:
                    del placed[k]
                    self._forget(r, score.cost[r // self.gpus_per_node, : self.layers])
                    break
            if not placed:
                del self._placed[request.request_id]
        hist = request.expert_histogram
        hit = self._cache.get(id(hist))
        if hit is not None and hit.histogram is hist:
            del self._cache[id(hist)]

    def _forget(self, rank: int, vector: np.ndarray) -> None:
        self._requests[rank] -= 1
        row = self._traffic[rank]
        if self._requests[rank] == 0:  # no float residue on an idle rank
            row[:] = 0.0
            self._traffic_sum[rank] = 0.0
        else:
            np.subtract(row, vector, out=row)
            np.maximum(row, 0.0, out=row)
            self._traffic_sum[rank] = max(0.0, self._traffic_sum[rank] - float(vector.sum()))

    def choose_ranks(self, requests: Sequence[RequestInfo], ranks: RankState) -> list[int | None]:
        per_node, nodes = ranks.gpus_per_node, ranks.num_nodes
        if per_node != self.gpus_per_node or nodes != self.num_nodes:
            raise ValueError(
                f"the placement has {self.num_nodes}x{self.gpus_per_node} GPUs, "
                f"the ranks {nodes}x{per_node}"
            )
        free = np.maximum(ranks.capacity - ranks.running, 0).astype(np.int64)
        load = ranks.load().astype(np.int64)
        admit = min(len(requests), int(free.sum()))
        chosen: list[int | None] = [None] * len(requests)
        if admit == 0:
            return chosen
        window = requests[:admit]
        scored = [i for i, r in enumerate(window) if r.expert_histogram is not None]
        if scored:
            scores = self._scores([window[i].expert_histogram for i in scored])  # type: ignore[misc]
            if self.weight == "prefill":  # a prompt sends all its tokens in its chunk
                scores = [
                    _weighted(score, max(window[i].prompt_tokens, 1))
                    for i, score in zip(scored, scores, strict=True)
                ]
            limit = node_limits(load, free, admit, LOAD_SLACK)
            picked = self._greedy(scores, limit, load)
            placed = self._placed
            for i, rank, score in zip(scored, picked, scores, strict=True):
                chosen[i] = rank
                entry = (rank, score)
                got = placed.get(window[i].request_id)
                if got is None:
                    placed[window[i].request_id] = [entry]
                else:
                    got.append(entry)
            taken = np.bincount(picked, minlength=ranks.num_ranks)
            load += taken
            free -= taken
        rest = [i for i, r in enumerate(window) if r.expert_histogram is None]
        if rest:
            anywhere = np.zeros(ranks.num_ranks, dtype=np.int64)
            picked_rest = water_fill(load, free, anywhere, np.array([len(rest)]))
            for i, rank in zip(rest, picked_rest.tolist(), strict=True):
                chosen[i] = rank
        return chosen

    def _place_one(self, score: _Score, limit: np.ndarray, load: np.ndarray) -> int:
        """:meth:`_greedy` for a window of one request (a server's usual window), the same
        arithmetic without the heaps; commits its traffic."""
        layers, per_node = self.layers, self.gpus_per_node
        total, count, cap = self._traffic_sum, load.tolist(), limit.tolist()
        unit = max(score.spread, 1.0)
        cand = []
        for n in range(self.num_nodes):
            best = -1
            for r in range(n * per_node, (n + 1) * per_node):
                if cap[r] and (best < 0 or (total[r], count[r]) < (total[best], count[best])):
                    best = r
            cand.append(best)
        offer = np.empty((self.num_nodes, layers + 1))
        offer[:, :layers] = self._traffic[np.maximum(cand, 0)]
        offer[:, layers] = [TIE * (total[r] + unit * count[r]) for r in cand]
        peak = np.empty(layers + 1)
        peak[:layers] = self._traffic.max(axis=0)
        peak[layers] = -np.inf
        for n, r in enumerate(cand):
            if r < 0:
                offer[n] = np.inf
        after = offer + score.cost
        n = int(np.dot(np.maximum(after, peak), np.ones(layers + 1)).argmin())
        r = cand[n]
        self._traffic[r] = after[n, :layers]
        total[r] += score.remote[n]
        self._requests[r] += 1
        return r

    def _greedy(self, scores: list[_Score], limit: np.ndarray, load: np.ndarray) -> list[int]:
        """Ranks for ``scores`` (module docstring, step 4); commits their traffic."""
        if len(scores) == 1:
            return [self._place_one(scores[0], limit, load)]
        return self._greedy_many(scores, limit, load)

    def _greedy_many(self, scores: list[_Score], limit: np.ndarray, load: np.ndarray) -> list[int]:
        layers, per_node = self.layers, self.gpus_per_node
        traffic = np.zeros((self.num_ranks, layers + 1))
        traffic[:, :layers] = self._traffic
        total = self._traffic_sum
        count = load.tolist()
        cap = limit.tolist()
        unit = max(sum(s.spread for s in scores) / len(scores), 1.0)
        for r in range(self.num_ranks):
            traffic[r, layers] = TIE * (total[r] + unit * count[r])
        peak = np.empty(layers + 1)
        peak[:layers] = traffic[:, :layers].max(axis=0)
        peak[layers] = -np.inf
        # Per node, a heap of its ranks with room: (predicted traffic, requests, rank).
        heaps = []
        for n in range(self.num_nodes):
            heap = [
                (total[r], count[r], r) for r in range(n * per_node, (n + 1) * per_node) if cap[r]
            ]
            heapq.heapify(heap)
            heaps.append(heap)
        cand = [h[0][2] if h else -1 for h in heaps]
        offer = traffic[np.maximum(cand, 0)]  # [nodes, layers + 1]: each node's candidate
        for n, r in enumerate(cand):
            if r < 0:
                offer[n] = np.inf
        peaks = np.tile(peak, (self.num_nodes, 1))
        ones = np.ones(layers + 1)
        after = np.empty_like(offer)
        top = np.empty_like(offer)
        order = np.argsort([-s.spread for s in scores], kind="stable").tolist()
        out = [0] * len(scores)
        add, maximum, dot = np.add, np.maximum, np.dot
        heapreplace, heappop, inf = heapq.heapreplace, heapq.heappop, np.inf
        for k in order:
            score = scores[k]
            add(offer, score.cost, out=after)
            maximum(after, peaks, out=top)
            n = int(dot(top, ones).argmin())
            r = cand[n]
            row = traffic[r]
            row[:] = after[n]
            peaks[:, :layers] = top[n, :layers]  # every row of peaks is the peak
            t = total[r] = total[r] + score.remote[n]
            c = count[r] = count[r] + 1
            row[layers] = TIE * (t + unit * c)
            out[k] = r
            heap = heaps[n]
            cap[r] -= 1
            if cap[r]:
                heapreplace(heap, (t, c, r))
            else:
                heappop(heap)
            if heap:
                cand[n] = q = heap[0][2]
                offer[n] = traffic[q]
            else:
                offer[n] = inf
        self._traffic = traffic[:, :layers].copy()
        for r in out:
            self._requests[r] += 1
        return out
