"""Our method: joint class-to-node shares and expert placement.

``--objective time`` (the default) is :mod:`ours_time`: the modelled MoE-layer time at
an operating point. This module is ``--objective remote-hits``, kept for comparison:

Decisions: ``x [classes, nodes]`` (share of each class's requests each node serves) and,
per MoE layer, ``z [experts, gpus]`` (a replica of expert e on GPU g; equal slots per GPU).
Objective: expected remote (token, expert) hits, weighted by link cost, under per-GPU
expert-load balance and per-node request-load balance within the tolerance.

The joint problem is bilinear in x and z, so it is decomposed and alternated:

1. x starts from :func:`balanced_class_shares` (each class on as few nodes as its weight
   allows, request load exactly balanced);
2. given x, every layer is an independent CP-SAT model (exact for that layer: its best
   bound is a certified lower bound of the layer's cost given x), warm-started from a
   greedy heuristic that is also the fallback;
3. given the placement, x is re-solved exactly as a linear program (GLOP) under the
   request-balance constraints; steps 2-3 repeat while x changes (at most ``ROUNDS``).

The reported bound is the sum of the per-layer CP-SAT bounds for the final x: a
certificate for the placement step, conditional on the class shares (the x step is an LP
optimum given the placement; the alternation itself carries no global certificate).
With redundant experts the model routes remote demand by flows it chooses, subject to
"local replica first"; SGLang's static dispatch spreads it evenly instead, so the plan's
predicted metrics are computed separately with that rule (metrics.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from scheduler.errors import ConfigError
from scheduler.placement.joint_bound import top_s
from scheduler.placement.methods.ours_greedy import (
    MAX_CPSAT_BINARIES,
    heuristic_layer,
    large_layers,
    replica_counts,
)
from scheduler.placement.metrics import gpu_loads, imbalance, node_demand, remote_cost
from scheduler.placement.placement import Placement
from scheduler.placement.problem import (
    PlacementProblem,
    PlacementResult,
    balanced_class_shares,
    combined_layer_status,
)
from scheduler.placement.step_time import BALANCE_SLACK

ROUNDS = 3
#: CP-SAT linearization level 2 (full LP relaxation): with redundancy it takes the bound
#: gap on ESFT from ~13% to under 1% at the same time limit.
LINEARIZATION = 2
#: Integer scale: node demands are scaled so the largest becomes about this.
DEMAND_SCALE = 100_000
COST_SCALE = 100


@dataclass
class _LayerSolution:
    row: np.ndarray  # [slots] logical expert per physical slot
    cost: float  # in demand units (unscaled), weighted by link cost
    bound: float
    status: str


# ----------------------------------------------------------------------------- CP-SAT


@dataclass(frozen=True)
class _LayerSettings:
    """What every layer's CP-SAT model shares in one solve: the slot layout, the GPU
    load tolerance, the link costs [nodes, nodes] and the solver's budget (deterministic
    time per layer, seed, workers)."""

    slots_per_gpu: int
    gpus_per_node: int
    tolerance: float
    link_cost: np.ndarray
    time_limit: float
    seed: int
    workers: int


def _solve_layer_cpsat(
    dem: np.ndarray,
    k: np.ndarray,
    hint: np.ndarray,
    settings: _LayerSettings,
    current: np.ndarray | None = None,
    max_moves: int | None = None,
) -> _LayerSolution:
    """One layer given node demands dem [nodes, experts] and replica counts k [experts],
    warm-started from ``hint [slots]``; with ``current [slots]`` and ``max_moves``, at
    most that many replicas move off their GPU.

    With at most one replica per node, SGLang's static dispatch is linear here: node n's
    demand for e goes to its own replica if it has one, otherwise evenly to e's k_e
    replicas, so every GPU load below is the exact expectation.
    """
    from ortools.sat.python import cp_model

    layer = _LayerModel.build(dem, k, settings)
    model = layer.model
    if current is not None and max_moves is not None:
        layer.limit_moves(current, max_moves)
    layer.add_hint(hint)

    solver = cp_model.CpSolver()
    solver.parameters.max_deterministic_time = settings.time_limit
    solver.parameters.max_time_in_seconds = 1.5 * settings.time_limit  # wall-clock safety net
    solver.parameters.num_workers = settings.workers
    solver.parameters.random_seed = settings.seed
    solver.parameters.linearization_level = LINEARIZATION
    status = solver.solve(model)
    name = solver.status_name(status)
    unit = layer.scale * COST_SCALE
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return _LayerSolution(hint, float("nan"), float("nan"), name)
    return _LayerSolution(
        layer.row(solver), solver.objective_value / unit, solver.best_objective_bound / unit, name
    )


@dataclass
class _LayerModel:
    """One layer's CP-SAT model: ``z[e, g]`` = a replica of e on GPU g, ``y[e, n]`` =
    node n holds e (a sum of z); demands are scaled to integers by ``scale``."""

    model: Any
    z: dict[tuple[int, int], Any]
    scale: float
    experts: int
    num_gpus: int
    slots_per_gpu: int

    @classmethod
    def build(cls, dem: np.ndarray, k: np.ndarray, settings: _LayerSettings) -> _LayerModel:
        """Variables, constraints (equal slots per GPU, k_e replicas at most one per
        node, GPU load within the tolerance) and the link-cost-weighted remote demand
        as the objective."""
        from ortools.sat.python import cp_model

        nodes, experts = dem.shape
        spg, g_per_node = settings.slots_per_gpu, settings.gpus_per_node
        num_gpus = nodes * g_per_node
        node_of = np.arange(num_gpus) // g_per_node
        scale = DEMAND_SCALE / max(float(dem.max()), 1e-12)
        d = np.rint(dem * scale).astype(np.int64)  # [nodes, experts]

        # --- variables: z[e, g] = a replica of e on GPU g; y[e, n] = node n holds e
        model = cp_model.CpModel()
        z = {
            (e, g): model.new_bool_var(f"z{e}_{g}") for e in range(experts) for g in range(num_gpus)
        }
        y = {
            (e, n): sum(z[e, g] for g in range(num_gpus) if node_of[g] == n)
            for e in range(experts)
            for n in range(nodes)
        }
        # --- equal slots per GPU
        for g in range(num_gpus):
            model.add(sum(z[e, g] for e in range(experts)) == spg)
        # --- k_e replicas of every expert, at most one per node
        for e in range(experts):
            model.add(sum(z[e, g] for g in range(num_gpus)) == int(k[e]))
            for n in range(nodes):
                model.add(y[e, n] <= 1)
        _add_gpu_load_caps(model, z, y, d, k, node_of, settings.tolerance)
        model.minimize(sum(_remote_cost_terms(model, z, y, d, k, node_of, settings.link_cost)))
        return cls(model, z, scale, experts, num_gpus, spg)

    def limit_moves(self, current: np.ndarray, max_moves: int) -> None:
        """Re-placement: at most ``max_moves`` replicas not already on their GPU."""
        experts, num_gpus, spg = self.experts, self.num_gpus, self.slots_per_gpu
        cur = np.zeros((experts, num_gpus), dtype=bool)
        cur[current, np.arange(num_gpus * spg) // spg] = True
        self.model.add(
            sum(self.z[e, g] for e in range(experts) for g in range(num_gpus) if not cur[e, g])
            <= max_moves
        )

    def add_hint(self, hint: np.ndarray) -> None:
        """Warm start from the heuristic's row ``hint [slots]``."""
        spg = self.slots_per_gpu
        hint_z = np.zeros((self.experts, self.num_gpus), dtype=bool)
        hint_z[hint, np.arange(self.num_gpus * spg) // spg] = True
        for (e, g), var in self.z.items():
            self.model.add_hint(var, bool(hint_z[e, g]))

    def row(self, solver: Any) -> np.ndarray:
        """[slots] the solved logical expert per physical slot."""
        spg = self.slots_per_gpu
        row = np.empty(self.num_gpus * spg, dtype=np.int64)
        for g in range(self.num_gpus):
            row[g * spg : (g + 1) * spg] = [
                e for e in range(self.experts) if solver.value(self.z[e, g])
            ]
        return row


def _add_gpu_load_caps(
    model: Any,
    z: dict[tuple[int, int], Any],
    y: dict[tuple[int, int], Any],
    d: np.ndarray,
    k: np.ndarray,
    node_of: np.ndarray,
    tol: float,
) -> None:
    """Every GPU's expected expert load under static dispatch within ``1 + tol`` of the
    mean: a single replica serves all its expert's demand, a replicated expert's local
    demand stays on its node and the rest is split evenly over its k_e replicas."""
    nodes, experts = d.shape
    num_gpus = len(node_of)
    total = d.sum(axis=0)
    cap = int(np.floor((1 + tol) * total.sum() / num_gpus))
    gpu_load: dict[int, list[Any]] = {g: [] for g in range(num_gpus)}
    for e in range(experts):
        if k[e] == 1:  # the single replica serves all demand
            for g in range(num_gpus):
                gpu_load[g].append(int(total[e]) * z[e, g])
            continue
        remote = int(total[e]) - sum(int(d[n, e]) * y[e, n] for n in range(nodes))
        for g in range(num_gpus):
            share = model.new_int_var(0, int(total[e]), f"u{e}_{g}")
            model.add(int(k[e]) * share <= remote).only_enforce_if(z[e, g])
            model.add(int(k[e]) * share >= remote - int(k[e]) + 1).only_enforce_if(z[e, g])
            model.add(share == 0).only_enforce_if(z[e, g].negated())
            gpu_load[g] += [int(d[node_of[g], e]) * z[e, g], share]
    for g in range(num_gpus):
        model.add(sum(gpu_load[g]) <= cap)


def _remote_cost_terms(
    model: Any,
    z: dict[tuple[int, int], Any],
    y: dict[tuple[int, int], Any],
    d: np.ndarray,
    k: np.ndarray,
    node_of: np.ndarray,
    link_cost: np.ndarray,
) -> list[Any]:
    """The objective's terms: remote demand, weighted by the link cost to the serving
    replica (one term per node lacking the expert on a uniform fabric)."""
    nodes, experts = d.shape
    num_gpus = len(node_of)
    cost = np.rint(link_cost * COST_SCALE).astype(np.int64)
    uniform = bool(np.all(cost[~np.eye(nodes, dtype=bool)] == cost.max()))
    terms: list[Any] = []
    for e in range(experts):
        if uniform:
            terms += [int(d[n, e] * cost.max()) * (1 - y[e, n]) for n in range(nodes) if d[n, e]]
        elif k[e] == 1:
            terms += [int((d[:, e] * cost[:, node_of[g]]).sum()) * z[e, g] for g in range(num_gpus)]
        else:  # w = z[e, g] and node n lacks e: n's demand reaches g with prob 1/k_e
            for n in range(nodes):
                for g in range(num_gpus):
                    c = int(d[n, e] * cost[n, node_of[g]] // k[e])
                    if c and node_of[g] != n:
                        w = model.new_bool_var(f"w{e}_{n}_{g}")
                        model.add(w >= z[e, g] - y[e, n])
                        terms.append(c * w)
    return terms


# ----------------------------------------------------------------------------- x step


def solve_shares(class_cost: np.ndarray, weights: np.ndarray, tol: float) -> np.ndarray:
    """LP: min sum x[c,n] cost[c,n], rows of x sum to 1, node request load within tol."""
    from ortools.linear_solver import pywraplp

    classes, nodes = class_cost.shape
    solver = pywraplp.Solver.CreateSolver("GLOP")
    x = [[solver.NumVar(0, 1, f"x{c}_{n}") for n in range(nodes)] for c in range(classes)]
    for c in range(classes):
        solver.Add(sum(x[c]) == 1)
    for n in range(nodes):
        load = sum(weights[c] * x[c][n] for c in range(classes))
        solver.Add(load <= (1 + tol) / nodes)
        solver.Add(load >= (1 - tol) / nodes)
    solver.Minimize(sum(class_cost[c, n] * x[c][n] for c in range(classes) for n in range(nodes)))
    if solver.Solve() != pywraplp.Solver.OPTIMAL:
        raise ConfigError(
            f"no class-to-node shares keep node request load within ±{tol:.0%}: loosen "
            "--balance-tolerance"
        )
    return np.array([[x[c][n].solution_value() for n in range(nodes)] for c in range(classes)])


def class_costs(
    demand: np.ndarray, rows: np.ndarray, spg: int, g_per_node: int, link_cost: np.ndarray
) -> np.ndarray:
    """[classes, nodes]: weighted remote demand of each class if served wholly on node n."""
    nodes = link_cost.shape[0]
    classes, layers, experts = demand.shape
    out = np.zeros((classes, nodes))
    node_of_slot = np.arange(rows.shape[1]) // spg // g_per_node
    for layer in range(layers):
        reps = np.zeros((experts, nodes))
        np.add.at(reps, (rows[layer], node_of_slot), 1)
        mean_cost = (reps @ link_cost.T) / reps.sum(axis=1, keepdims=True)  # [experts, src]
        unit = np.where(reps.T > 0, 0.0, mean_cost.T)  # [src nodes, experts]
        out += demand[:, layer, :] @ unit.T
    return out


# ----------------------------------------------------------------------------- driver


def solve_remote_hits(problem: PlacementProblem) -> PlacementResult:
    start = time.perf_counter()
    m, t = problem.profile.model, problem.topology
    demand, weights = problem.demand, problem.weights
    spg, slots, g = problem.slots_per_gpu, problem.num_slots, t.gpus_per_node
    if spg * g > m.num_experts + problem.redundant_experts:
        raise ConfigError("more slots per node than slots in a layer")  # cannot happen
    if t.nodes * g * spg < m.num_experts:
        raise ConfigError(f"{m.num_experts} experts do not fit in {t.num_gpus * spg} slots")
    use_cpsat = m.num_experts * t.num_gpus <= MAX_CPSAT_BINARIES
    if problem.redundant_experts > m.num_experts * (t.nodes - 1):
        raise ConfigError(
            f"--redundant-experts {problem.redundant_experts} exceeds one replica of every "
            f"expert per node ({m.num_experts * (t.nodes - 1)} extra slots on {t.nodes} nodes); "
            "--objective remote-hits keeps at most one replica of an expert per node; "
            "--objective time (the default) has no such limit"
        )
    current = problem.current.phy2log if problem.current is not None else None
    moves_left = problem.max_moves

    settings = _LayerSettings(
        slots_per_gpu=spg,
        gpus_per_node=g,
        tolerance=problem.balance_tolerance,
        link_cost=t.link_cost,
        # CP-SAT's deterministic time (not wall time) keeps runs reproducible
        time_limit=problem.time_limit_s / (ROUNDS * m.num_moe_layers),
        seed=problem.seed,
        workers=problem.workers,
    )

    shares = balanced_class_shares(weights, t.nodes)
    history = []
    rows = np.zeros((m.num_moe_layers, slots), dtype=np.int64)
    bounds = np.zeros(m.num_moe_layers)
    statuses: list[str] = []
    for round_ in range(ROUNDS):
        nd = node_demand(demand, shares)  # [nodes, layers, experts]
        statuses = []
        if not use_cpsat:
            rows = large_layers(
                nd, rows if round_ else current, slots, spg, g, problem.time_limit_s / ROUNDS
            )
            statuses = ["HEURISTIC"] * m.num_moe_layers
            bounds[:] = np.nan
        for layer in range(m.num_moe_layers if use_cpsat else 0):
            dem = nd[:, layer, :]
            cur = None if current is None else current[layer]
            k = (
                np.bincount(cur, minlength=m.num_experts)
                if cur is not None
                else replica_counts(dem, slots)
            )
            hint = heuristic_layer(dem, k, spg, g, problem.balance_tolerance, cur)
            layer_moves = None
            if moves_left is not None:
                layer_moves = moves_left // (m.num_moe_layers - layer)
            sol = _solve_layer_cpsat(dem, k, hint, settings, cur, layer_moves)
            statuses.append(sol.status)
            rows[layer], bounds[layer] = sol.row, sol.bound
        _, cost = remote_cost(nd, Placement(rows, m.num_experts, t.num_gpus, g), t.link_cost)
        history.append({"round": round_, "cost": cost, "shares": shares.round(4).tolist()})
        class_cost = class_costs(demand, rows, spg, g, t.link_cost)
        new_shares = solve_shares(class_cost, weights, problem.balance_tolerance)
        if np.allclose(new_shares, shares, atol=1e-6) or round_ == ROUNDS - 1:
            break
        new_cost = float((class_cost * new_shares).sum())
        if new_cost >= cost - 1e-9:
            break
        shares = new_shares
    if moves_left is not None and current is not None:
        placement_moves = Placement(rows, m.num_experts, t.num_gpus, g).moves_from(
            problem.current  # type: ignore[arg-type]
        )
        history.append({"moves": placement_moves})
    # A layer CP-SAT proved infeasible, or gave no solution in time, keeps its heuristic
    # row; its balance is whatever that row reaches, checked here.
    loads = gpu_loads(node_demand(demand, shares), Placement(rows, m.num_experts, t.num_gpus, g))
    layer_imbalance = imbalance(loads)
    over = layer_imbalance > 1 + problem.balance_tolerance + BALANCE_SLACK
    relaxed = [layer for layer, s in enumerate(statuses) if s == "INFEASIBLE" or over[layer]]
    if relaxed:
        status = "BALANCE_RELAXED"
    elif not use_cpsat:
        status = "HEURISTIC"  # every layer placed by the large-layer heuristic
    else:
        status = combined_layer_status(statuses)  # CP-SAT status names per layer
    if relaxed:
        bounds[relaxed] = np.nan
    # In this objective's units (remote hits over the profile's counts x link cost): every
    # class at best finds a node's worth of its most used experts locally.
    cheapest = t.link_cost[~np.eye(t.nodes, dtype=bool)].min() if t.nodes > 1 else 0.0
    best_local = top_s(demand, min(spg * g, m.num_experts)).sum() if t.nodes > 1 else demand.sum()
    joint_hits = float(demand.sum() - best_local) * float(cheapest)
    return PlacementResult(
        method="ours",
        placement=Placement(rows, m.num_experts, t.num_gpus, g),
        class_to_node_share=shares,
        status=status,
        solve_seconds=time.perf_counter() - start,
        objective=cost,
        bound=joint_hits,
        details={
            "rounds": history,
            "layer_status": {s: statuses.count(s) for s in set(statuses)},
            "objective_units": "expected remote (token, expert) hits x link cost, over the "
            "profile's counts",
            "objective": "remote-hits",
            "conditional_bound": float(bounds.sum()) if not np.isnan(bounds).any() else None,
            "conditional_bound_scope": "sum of per-layer CP-SAT bounds given the final class "
            "shares (not a bound on the joint problem)",
            **(
                {
                    "balance_relaxed": {
                        "tolerance": problem.balance_tolerance,
                        "gpu_load_imbalance_by_layer": {
                            layer: round(float(layer_imbalance[layer]), 4) for layer in relaxed
                        },
                    }
                }
                if relaxed
                else {}
            ),
            "bound_scope": "joint: any class shares and any placement (every class finds at "
            "best a node's worth of its most used experts locally)",
        },
    )
