"""The built-in routing policies: SGLang's two balancers, paper B's class affinity and
ELDR's locality band (docs/policies.md, docs/sources.md). Pure: arrays in, a rank out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from scheduler.placement.placement import Placement
from scheduler.policies.base import RankState, RequestInfo, RoutingPolicy


class RoundRobin(RoutingPolicy):
    """Ranks in turn (SGLang's default ``round_robin``), skipping full ranks."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose_rank(self, request: RequestInfo, ranks: RankState) -> int | None:
        free = ranks.free()
        if not free.any():
            return None
        order = (self._next + np.arange(ranks.num_ranks)) % ranks.num_ranks
        rank = int(order[np.argmax(free[order])])
        self._next = (rank + 1) % ranks.num_ranks
        return rank


class TotalRequests(RoutingPolicy):
    """SGLang's ``total_requests`` balancer: the free rank with the fewest running +
    waiting requests (lowest index on ties)."""

    name = "total_requests"

    def choose_rank(self, request: RequestInfo, ranks: RankState) -> int | None:
        return ranks.least_loaded()


class ClassAffinity(RoutingPolicy):
    """Send a class to its node group (paper B), with the plan's ``class_to_node_share``.

    Per class, nodes are taken by smooth weighted round-robin over the class's shares
    (deterministic: over any window the picks follow the shares as closely as integers
    allow); the request goes to the least-loaded free rank of that node. When the node
    is full, or the class is unknown or None, it spills to the least-loaded free rank
    anywhere.

    ``class_to_node_share``: class -> [nodes] non-negative shares summing to 1.
    """

    name = "class_affinity"

    def __init__(self, class_to_node_share: Mapping[str, Sequence[float]]) -> None:
        self.shares = {k: np.asarray(v, dtype=np.float64) for k, v in class_to_node_share.items()}
        for name, row in self.shares.items():
            if row.ndim != 1 or (row < 0).any() or not row.sum() > 0:
                raise ValueError(f"class_to_node_share[{name!r}] must be non-negative shares")
        self._current = {k: np.zeros_like(v) for k, v in self.shares.items()}
        #: Requests routed to the class's chosen node, and those that spilled elsewhere.
        self.on_node = 0
        self.spilled = 0

    def next_node(self, cls: str) -> int:
        """The class's next node (smooth weighted round-robin, as nginx's upstreams)."""
        weights = self.shares[cls]
        current = self._current[cls]
        current += weights
        node = int(np.argmax(current))
        current[node] -= weights.sum()
        return node

    def choose_rank(self, request: RequestInfo, ranks: RankState) -> int | None:
        cls = request.predicted_class
        if cls is not None and cls in self.shares:
            if self.shares[cls].size != ranks.num_nodes:
                raise ValueError(
                    f"class_to_node_share has {self.shares[cls].size} nodes, "
                    f"the cluster {ranks.num_nodes}"
                )
            node = self.next_node(cls)
            on_node = np.arange(ranks.num_ranks) // ranks.gpus_per_node == node
            rank = ranks.least_loaded(on_node)
            if rank is not None:
                self.on_node += 1
                return rank
        rank = ranks.least_loaded()
        if rank is not None:
            self.spilled += 1
        return rank


class LocalityBand(RoutingPolicy):
    """ELDR's locality-band routing (docs/sources.md, ELDR), at node granularity.

    Each node scores the request by the share of its predicted (token, expert) pairs
    whose expert has a replica on that node under ``placement``; nodes scoring at least
    ``(1 - band) x`` the best score form the band; the request goes to the least-loaded
    free rank in the band, else (band full, or no histogram) the least-loaded free rank
    anywhere. ELDR's own signature is count x IDF over a layer mask, matched to
    per-worker centroids; here the placement plays the centroids' part.
    """

    name = "locality_band"

    def __init__(self, placement: Placement, band: float = 0.1) -> None:
        if not 0 <= band <= 1:
            raise ValueError(f"band must be in [0, 1], got {band}")
        self.band = band
        self.gpus_per_node = placement.gpus_per_node
        #: [layers * experts, nodes] 1 where the node holds a replica of the expert.
        self.present = placement.node_presence()

    def node_scores(self, histogram: np.ndarray) -> np.ndarray:
        """[nodes] share of ``histogram [layers, experts]``'s pairs served on each node."""
        counts = np.asarray(histogram, dtype=np.float64).ravel()
        if counts.size != self.present.shape[0]:
            raise ValueError(
                f"expert histogram has {counts.size} cells, the placement "
                f"{self.present.shape[0]} (layers x experts)"
            )
        total = counts.sum()
        return counts @ self.present / total if total > 0 else np.ones(self.present.shape[1])

    def choose_rank(self, request: RequestInfo, ranks: RankState) -> int | None:
        if request.expert_histogram is not None:
            scores = self.node_scores(request.expert_histogram)
            band = scores >= scores.max() * (1 - self.band)
            rank = ranks.least_loaded(np.repeat(band, ranks.gpus_per_node))
            if rank is not None:
                return rank
        return ranks.least_loaded()
