"""A lower bound on the joint problem: class shares and placement chosen together.

Locality. Let ``w_c`` be the classes' token shares (``step_time.token_shares``),
``p[c, l, e]`` the picks per token (``sum_e p = top_k``) and ``S`` the distinct experts
a node can hold (``min(slots per node, experts)``). For any class shares ``x[c, n]``
(rows summing to 1, node request load within the tolerance) and any placement
(``y[l, e, n] = 1`` where node ``n`` holds expert ``e``), the local picks per token are
``sum w_c x[c, n] p[c, l, e] y[l, e, n]``. Relaxing ``y`` to ``[0, 1]`` and writing
``m[c, n, l, e]`` for each product, the LP::

    max  sum m
    s.t. m[c, n, l, e] <= w_c p[c, l, e] x[c, n]
         m[c, n, l, e] <= w_c p[c, l, e] y[l, e, n]
         sum_e m[c, n, l, e] <= w_c x[c, n] top_S(p[c, l])
         sum_e y[l, e, n] <= S
         sum_n x[c, n] = 1, node request load within the tolerance

is an upper bound on local picks (every integer solution is feasible in it, with
``m = w x p y``; the third row holds because a node holds at most ``S`` experts).
Solved with GLOP when it has at most :data:`MAX_LP_VARIABLES` variables; above that
the closed form ``sum_c w_c top_S(p[c, l])`` (the LP without its coupling rows: every
class alone on a node of its own) is used, weaker but still valid.

Time. For every layer, the busiest rank's copies are at least the mean rank's, and a
token's expected copies to other nodes are at least its remote picks / top_k (``1 - (1 -
s)^k >= s``); the busiest GPU's expert time is at least the mean GPU's FLOPs and the
mean GPU's reads of the experts the step touches. Summed with the fixed latencies, that
bounds the expected modelled MoE-layer time of any shares and placement from below (in
the model of :mod:`scheduler.placement.step_time`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from scheduler.placement.step_time import LayerCost, pick_probabilities, token_shares

if TYPE_CHECKING:
    from scheduler.placement.problem import PlacementProblem

#: Largest LP (m variables) solved; above it the closed form is used.
MAX_LP_VARIABLES = 8_000


@dataclass(frozen=True)
class JointBound:
    """``local_picks`` per token summed over layers (an upper bound), the matching
    ``remote_fraction`` (a lower bound) and ``time_us`` per layer (a lower bound)."""

    local_picks: float
    remote_fraction: float
    time_us: float
    method: str
    seconds: float

    def details(self) -> dict[str, Any]:
        return {
            "bound_scope": "joint: any class shares and any placement (joint_bound.py; "
            f"{self.method})",
            "remote_fraction_bound": round(self.remote_fraction, 6),
            "bound_seconds": round(self.seconds, 3),
        }


def top_s(p: np.ndarray, s: int) -> np.ndarray:
    """[..., experts] -> [...] the sum of the ``s`` largest entries."""
    return -np.sort(-p, axis=-1)[..., :s].sum(axis=-1)


def _lp_local(
    w: np.ndarray, p: np.ndarray, s: int, tolerance: float, nodes: int, time_limit_s: float
) -> float | None:
    """The LP of the module docstring; None when GLOP does not prove optimality."""
    from ortools.linear_solver import pywraplp

    classes, layers, experts = p.shape
    solver = pywraplp.Solver.CreateSolver("GLOP")
    solver.SetTimeLimit(int(time_limit_s * 1000))
    x = [[solver.NumVar(0, 1, "") for _ in range(nodes)] for _ in range(classes)]
    for c in range(classes):
        solver.Add(sum(x[c]) == 1)
    for n in range(nodes):
        load = sum(float(w[c]) * x[c][n] for c in range(classes))
        solver.Add(load <= (1 + tolerance) / nodes)
        solver.Add(load >= max(0.0, 1 - tolerance) / nodes)
    top = top_s(p, s)  # [classes, layers]
    objective = []
    for layer in range(layers):
        for n in range(nodes):
            y = [solver.NumVar(0, 1, "") for _ in range(experts)]
            solver.Add(sum(y) <= s)
            for c in range(classes):
                used = np.flatnonzero(p[c, layer] > 0)
                if not used.size:
                    continue
                ms = []
                for e in used.tolist():
                    mass = float(w[c] * p[c, layer, e])
                    m = solver.NumVar(0, mass, "")
                    solver.Add(m <= mass * x[c][n])
                    solver.Add(m <= mass * y[e])
                    ms.append(m)
                solver.Add(sum(ms) <= float(w[c] * top[c, layer]) * x[c][n])
                objective += ms
    solver.Maximize(sum(objective))
    if solver.Solve() != pywraplp.Solver.OPTIMAL:
        return None
    # GLOP's optimum is exact up to its tolerances; a dual-feasible value would be safer,
    # but the primal optimum of an LP equals its dual (strong duality).
    return float(solver.Objective().Value())


def joint_bound(problem: PlacementProblem, cost: LayerCost) -> JointBound:
    """The bound of the module docstring for ``problem`` at its operating point."""
    start = time.perf_counter()
    m, t = problem.profile.model, problem.topology
    w = token_shares(problem.demand)
    p = pick_probabilities(problem.demand, m.top_k)  # [classes, layers, experts]
    s = min(problem.slots_per_gpu * t.gpus_per_node, m.num_experts)
    layers = max(m.num_moe_layers, 1)
    closed = float((w[:, None] * top_s(p, s)).sum())
    local, method = closed, "closed form, every class on a node of its own"
    if t.nodes == 1:
        local, method = float(m.top_k * layers), "one node: every pick is local"
    elif int((p > 0).sum()) * t.nodes <= MAX_LP_VARIABLES:
        value = _lp_local(w, p, s, problem.balance_tolerance, t.nodes, problem.time_limit_s)
        if value is not None:
            local, method = min(value, closed), "LP relaxation (GLOP)"
    picks = m.top_k * layers
    remote_fraction = max(0.0, 1.0 - local / picks) if picks else 0.0
    tokens = problem.operating_point.tokens_per_rank
    inter = tokens * remote_fraction  # copies per rank per layer, averaged over layers
    # experts: the mean GPU's FLOPs and its share of the experts the step touches
    pooled = np.einsum("c,cle->le", w, p) * tokens * t.num_gpus  # [layers, experts] pairs
    touched = (1.0 - np.exp(-pooled)).sum(axis=1) / t.num_gpus  # [layers]
    flops = tokens * m.top_k * cost.flop_us_per_pair
    expert = np.maximum(flops, touched * cost.read_us_per_expert)
    time_us = cost.fixed_us + inter * cost.inter_us_per_copy + float(expert.mean())
    return JointBound(local, remote_fraction, time_us, method, time.perf_counter() - start)
