"""Expected modelled MoE-layer time of a placement at an operating point (docs/placement.md).

The placement objective of ``ours`` (``--objective time``). Pure numpy; the physics is
the project's one cost model (:class:`~scheduler.accounting.cost_model.CostModel`) and
SGLang's static dispatch (:mod:`scheduler.accounting.dispatch`) taken in expectation:

* every rank runs ``tokens`` tokens per step (the operating point) whose picks follow
  its node's class mix: ``p[n, e]`` expected picks of expert ``e`` per token (``sum_e p =
  top_k``), so rank demand is ``tokens[n] x p[n, e]`` (token, expert) pairs;
* a rank's pick of ``e`` reaches its own GPU if it holds a replica, else the node's
  lowest-slot replica when the node holds some but not all replicas, else (no replica
  on the node, or all of them on it) one replica dealt at random: in expectation an even
  spread over the replicas;
* a token sends one copy per distinct other node it reaches (DeepEP normal kernels, as
  the accounting counts it): with ``pi[c, n, m]`` the share of a class-``c`` token's
  picks that land on node ``m`` from node ``n``, the expected copies are
  ``1 - (1 - pi)^top_k`` (exact for top-1), mixed by the node's class shares (so the
  experts a class uses together count once per node they sit on); likewise, with the
  node's mix, for the other GPUs of its own node over NVLink;
* the layer time is the cost model's: dispatch and combine padded to the busiest rank,
  experts at the busiest GPU (max of FLOPs over its pairs and reads of its distinct
  experts, an expert counting ``1 - exp(-pairs)`` of a read).

``LayerState`` keeps every expert's contribution so that a move (two slots swapped, or
a slot given to another expert) is re-evaluated from the two experts it touches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scheduler.accounting.cost_model import CostModel
from scheduler.accounting.metrics import bytes_per_copy
from scheduler.errors import ConfigError
from scheduler.model_shape import ModelShape

PHASES = ("decode", "prefill")
#: Default tokens per rank per step: 128 running requests in decode (DeepEP's
#: low-latency kernels are sized for it), an 8,192-token chunk in prefill.
DEFAULT_TOKENS = {"decode": 128, "prefill": 8192}
#: The objective's busiest rank: ``mean + BUSIEST_WEIGHT x (max - mean)`` of the ranks'
#: expected copies. The profile's per-node differences are estimates from other requests
#: than those served, and only part of them shows in held-out traffic; the mean copies
#: do (docs/placement.md, "The objective"). 1 would trust the estimate fully.
BUSIEST_WEIGHT = 0.5

#: Load above the tolerance by less than this share of the mean is rounding (the
#: remote-hits solve checks balance in integers), not a violation.
BALANCE_SLACK = 1e-3

#: One expert's share of a layer's sums: (lam, mu, load, distinct); see LayerState.
Contribution = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class OperatingPoint:
    """``phase`` and ``tokens_per_rank`` per step (decode: running requests per rank)."""

    phase: str = "decode"
    tokens_per_rank: int = DEFAULT_TOKENS["decode"]

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ConfigError(f"--phase must be one of {', '.join(PHASES)}, got {self.phase!r}")
        if self.tokens_per_rank < 1:
            raise ConfigError(f"--tokens-per-rank must be >= 1, got {self.tokens_per_rank}")

    @classmethod
    def of(cls, phase: str = "decode", tokens_per_rank: int | None = None) -> OperatingPoint:
        return cls(
            phase, DEFAULT_TOKENS.get(phase, 1) if tokens_per_rank is None else tokens_per_rank
        )


def pick_probabilities(demand: np.ndarray, top_k: int) -> np.ndarray:
    """[classes, layers, experts] counts -> expected picks per token (each (class, layer)
    row sums to ``top_k``); a class with no counts in a layer takes the others' mix."""
    demand = np.asarray(demand, dtype=np.float64)
    totals = demand.sum(axis=2, keepdims=True)
    pooled = demand.sum(axis=0, keepdims=True)
    pooled_total = pooled.sum(axis=2, keepdims=True)
    uniform = np.full_like(pooled, top_k / max(demand.shape[2], 1))
    pooled_p = np.where(
        pooled_total > 0, pooled * top_k / np.where(pooled_total > 0, pooled_total, 1), uniform
    )
    own = demand * top_k / np.where(totals > 0, totals, 1)
    return np.where(totals > 0, own, pooled_p)


def token_shares(demand: np.ndarray) -> np.ndarray:
    """[classes] each class's share of the profile's (token, expert) pairs: its share of
    the tokens in flight (decode: a class's share of running requests is its arrival rate
    times its length, what its decode counts measure)."""
    total = np.asarray(demand, dtype=np.float64).sum(axis=(1, 2))
    if total.sum() <= 0:
        return np.full(total.size, 1.0 / max(total.size, 1))
    return total / total.sum()


def node_operating_point(
    demand: np.ndarray, weights: np.ndarray, shares: np.ndarray, top_k: int, tokens_per_rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pc [classes, layers, experts] picks per token, mix [nodes, classes] each node's
    class shares, tokens [nodes] per rank per step) when class ``c`` sends a share
    ``shares[c, n]`` of its requests to node ``n``. Every rank runs ``tokens_per_rank``
    tokens: the routing policies keep ranks at the same load (capacity, load caps), so a
    class mix that moves changes what a node's ranks run, not how much."""
    probs = pick_probabilities(demand, top_k)  # [classes, layers, experts]
    mass = weights[:, None] * shares  # [classes, nodes]
    load = mass.sum(axis=0)  # [nodes]
    tokens = np.full(shares.shape[1], float(tokens_per_rank))
    mix = np.divide(mass, load[None, :], out=np.full_like(mass, 1.0 / len(weights)), where=load > 0)
    return probs, mix.T, tokens


@dataclass(frozen=True)
class LayerCost:
    """Coefficients that turn copies and pairs into microseconds (from the cost model)."""

    inter_us_per_copy: float  # dispatch + combine over the NIC
    intra_us_per_copy: float  # dispatch + combine over NVLink
    fixed_us: float  # two kernel latencies + the experts' fixed part
    flop_us_per_pair: float
    read_us_per_expert: float

    @classmethod
    def of(cls, cost: CostModel, model: ModelShape) -> LayerCost:
        size = bytes_per_copy(model.hidden_size)
        per_byte_inter = 1.0 / (cost.efficiency * cost.inter_node_gbps) / 1e3
        per_byte_intra = 1.0 / (cost.efficiency * cost.intra_node_gbps) / 1e3
        return cls(
            inter_us_per_copy=size.total * per_byte_inter,
            intra_us_per_copy=size.total * per_byte_intra,
            fixed_us=2 * cost.latency_us + cost.expert_fixed_us,
            flop_us_per_pair=float(cost.flop_us(1.0, model)),
            read_us_per_expert=float(cost.weight_read_us(1.0, model)),
        )


@dataclass(frozen=True)
class LayerEval:
    """One layer's expected step: busiest / mean rank copies, busiest GPU pairs and
    distinct experts, GPU load imbalance, and the time (us) and objective."""

    time_us: float
    objective: float
    max_inter: float
    mean_inter: float
    max_intra: float
    max_load: float
    mean_load: float
    max_distinct: float


class LayerState:
    """One MoE layer's placement with every expert's contribution to the expected step.

    ``pc [classes, experts]`` picks per token of each class, ``mix [nodes, classes]``
    each node's class shares, ``tokens [nodes]`` per rank per step, ``row [slots]`` the
    expert of every slot.
    """

    def __init__(
        self,
        pc: np.ndarray,
        mix: np.ndarray,
        tokens: np.ndarray,
        row: np.ndarray,
        slots_per_gpu: int,
        gpus_per_node: int,
        top_k: int,
        cost: LayerCost,
    ) -> None:
        self.pc = np.asarray(pc, dtype=np.float64)  # [classes, experts]
        self.mix = np.asarray(mix, dtype=np.float64)  # [nodes, classes]
        self.p = self.mix @ self.pc  # [nodes, experts]
        self.nodes, self.experts = self.p.shape
        self.g = gpus_per_node
        self.gpus = self.nodes * gpus_per_node
        self.spg = slots_per_gpu
        self.k = top_k
        self.cost = cost
        self.node_of = np.arange(self.gpus) // gpus_per_node
        self.local_of = np.arange(self.gpus) % gpus_per_node
        self.rank_tokens = np.asarray(tokens, dtype=np.float64)[self.node_of]  # [ranks]
        self.rank_p = self.p[self.node_of]  # [ranks, experts]
        self.node_tokens = np.asarray(tokens, dtype=np.float64)
        self.row = np.asarray(row, dtype=np.int64).copy()
        self.slot_gpu = np.arange(self.row.size) // slots_per_gpu
        self.h = np.zeros((self.experts, self.gpus), dtype=np.int64)
        np.add.at(self.h, (self.row, self.slot_gpu), 1)
        # per-expert contributions
        self.lam = np.zeros((self.experts, self.nodes, self.nodes))  # share sent n -> m
        self.mu = np.zeros((self.experts, self.gpus, gpus_per_node))  # picks r -> local GPU j
        self.load = np.zeros((self.experts, self.gpus))  # pairs on each GPU
        self.dist = np.zeros((self.experts, self.gpus))  # expected reads on each GPU
        for e in range(self.experts):
            self.lam[e], self.mu[e], self.load[e], self.dist[e] = self._contribution(e, self.h[e])
        # picks per token of each class sent from node n to node m: [classes, nodes, nodes]
        self.lam_sum = np.einsum("ce,enm->cnm", self.pc, self.lam)
        self.mu_sum = self.mu.sum(axis=0)
        self.load_sum = self.load.sum(axis=0)
        self.distinct_sum = self.dist.sum(axis=0)
        self.mean_load = float(self.load_sum.mean())

    # ------------------------------------------------------------------ physics

    def _contribution(self, e: int, h_e: np.ndarray) -> Contribution:
        """(lam [nodes, nodes], mu [ranks, G], load [gpus], distinct [gpus]) of expert
        ``e`` placed as ``h_e [gpus]`` replica counts (module docstring)."""
        nodes, g = self.nodes, self.g
        k = h_e.sum()
        q = self.rank_p[:, e]  # [ranks] picks per token
        demand = q * self.rank_tokens  # [ranks] pairs per step
        own = h_e > 0
        if k == 1:  # one replica: every rank's picks reach it (the common case, fast)
            holder = int(np.argmax(own))
            home = holder // g
            load = np.zeros(self.gpus)
            load[holder] = demand.sum()
            lam = np.zeros((nodes, nodes))
            lam[:, home] = 1.0
            lam[home, home] = 0.0
            mu = np.zeros((self.gpus, g))
            mu[home * g : (home + 1) * g, holder - home * g] = q[home * g : (home + 1) * g]
            mu[holder] = 0.0
            return lam, mu, load, (1.0 - np.exp(-load)) * own
        cnt = h_e.reshape(nodes, g).sum(axis=1)
        narrow = (cnt > 0) & (cnt < k)
        first = np.arange(nodes) * g + (h_e.reshape(nodes, g) > 0).argmax(axis=1)
        load = np.zeros(self.gpus)
        load[own] += demand[own]
        rest = ~own
        to_first = rest & narrow[self.node_of]
        np.add.at(load, first[self.node_of[to_first]], demand[to_first])
        spread = rest & ~narrow[self.node_of]
        share = h_e / k
        load += demand[spread].sum() * share
        # inter-node picks: nodes without a replica spread over the replicas' nodes (per
        # pick of e; the classes' pick rates multiply it in the sums)
        absent = cnt == 0
        lam = np.outer(absent.astype(np.float64), cnt / k)
        # intra-node picks of ranks without their own replica
        mu = np.zeros((self.gpus, g))
        if to_first.any():
            mu[to_first, self.local_of[first[self.node_of[to_first]]]] += q[to_first]
        on_node_spread = spread & ~absent[self.node_of]
        if on_node_spread.any():
            local_share = share.reshape(nodes, g)[self.node_of[on_node_spread]]
            mu[on_node_spread] += q[on_node_spread, None] * local_share
        return lam, mu, load, (1.0 - np.exp(-load)) * own

    def inter_copies(self, lam: np.ndarray | None = None) -> np.ndarray:
        """[nodes] expected copies per rank per step to other nodes: each class's tokens
        reach other nodes by its own picks (experts a class uses together sit together),
        mixed by the node's class shares."""
        lam = self.lam_sum if lam is None else lam
        per_class = self._copies(lam)  # [classes, nodes]
        return (self.mix * per_class.T).sum(axis=1) * self.node_tokens

    def _copies(self, picks: np.ndarray) -> np.ndarray:
        """Expected distinct destinations reached per token, from picks per destination."""
        share = np.clip(picks / self.k, 0.0, 1.0)
        return (1.0 - (1.0 - share) ** self.k).sum(axis=-1)

    def evaluate(
        self,
        lam: np.ndarray | None = None,
        mu: np.ndarray | None = None,
        load: np.ndarray | None = None,
        distinct: np.ndarray | None = None,
        tolerance: float | None = None,
    ) -> LayerEval:
        """The layer's expected step (current placement, or the sums given); with a
        ``tolerance`` the objective first charges GPU load above ``(1 + tolerance)`` x
        the mean."""
        lam = self.lam_sum if lam is None else lam
        mu = self.mu_sum if mu is None else mu
        load = self.load_sum if load is None else load
        distinct = self.distinct_sum if distinct is None else distinct
        inter = self.inter_copies(lam)  # [nodes] per rank
        mu_other = mu.copy()
        mu_other[np.arange(self.gpus), self.local_of] = 0.0
        intra = self._copies(mu_other) * self.rank_tokens  # [ranks]
        c = self.cost
        max_inter, max_intra = float(inter.max()), float(intra.max())
        max_load = float(load.max())
        bytes_us = max(max_inter * c.inter_us_per_copy, max_intra * c.intra_us_per_copy)
        expert_us = max(max_load * c.flop_us_per_pair, float(distinct.max()) * c.read_us_per_expert)
        time_us = c.fixed_us + bytes_us + expert_us
        busiest = float(inter.mean()) + BUSIEST_WEIGHT * (max_inter - float(inter.mean()))
        objective = (
            c.fixed_us
            + max(busiest * c.inter_us_per_copy, max_intra * c.intra_us_per_copy)
            + expert_us
        )
        if tolerance is not None and self.mean_load > 0:
            over = max_load - (1 + tolerance + BALANCE_SLACK) * self.mean_load
            objective += max(over, 0.0) / self.mean_load * 1e6  # balance first
        return LayerEval(
            time_us=time_us,
            objective=objective,
            max_inter=max_inter,
            mean_inter=float(inter.mean()),
            max_intra=max_intra,
            max_load=max_load,
            mean_load=self.mean_load,
            max_distinct=float(distinct.max()),
        )

    # ------------------------------------------------------------------ moves

    def try_move(
        self, changes: dict[int, np.ndarray], tolerance: float | None
    ) -> tuple[LayerEval, dict[int, Contribution]]:
        """Evaluate new replica counts ``changes[e] = h_e [gpus]`` for a few experts
        without applying them; returns the evaluation and the new contributions."""
        lam, mu = self.lam_sum.copy(), self.mu_sum.copy()
        load, distinct = self.load_sum.copy(), self.distinct_sum.copy()
        new = {}
        for e, h_e in changes.items():
            c = new[e] = self._contribution(e, h_e)
            lam += self.pc[:, e, None, None] * (c[0] - self.lam[e])[None]
            mu += c[1] - self.mu[e]
            load += c[2] - self.load[e]
            distinct += c[3] - self.dist[e]
        return self.evaluate(lam, mu, load, distinct, tolerance), new

    def apply(self, slot_changes: dict[int, int], contributions: dict[int, Contribution]) -> None:
        """Write slot contents and the experts' new contributions."""
        for slot, expert in slot_changes.items():
            self.h[self.row[slot], self.slot_gpu[slot]] -= 1
            self.row[slot] = expert
            self.h[expert, self.slot_gpu[slot]] += 1
        for e, (lam, mu, load, dist) in contributions.items():
            self.lam_sum += self.pc[:, e, None, None] * (lam - self.lam[e])[None]
            self.mu_sum += mu - self.mu[e]
            self.load_sum += load - self.load[e]
            self.distinct_sum += dist - self.dist[e]
            self.lam[e], self.mu[e], self.load[e], self.dist[e] = lam, mu, load, dist
