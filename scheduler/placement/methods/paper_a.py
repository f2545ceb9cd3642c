"""Paper A (Sivtsov et al., arXiv 2508.09229): traffic-weighted topology ILP, per layer.

Written from our formulation consistent with the paper (docs/sources.md, paper A: the
paper's own variable list is not public; docs/placement-peers.md lists every choice made
here). Per MoE layer:

- Token sources: A does not route requests, so tokens come from every rank alike
  (round-robin shares): node n sends ``src[n, e] = demand[e] / nodes``.
- Link cost ``w(s, m)``: the topology's node-to-node cost (0 inside a node, as in A).
- Redundancy (A's replication is unknown): replica counts come from EPLB's rule (each
  extra slot to the expert with the largest load per replica); the ILP decides where
  they go. An expert with one replica costs ``sum_s src[s, e] * w(s, node)``, linear in
  its node; a replicated expert serves each source from its cheapest node holding a
  replica (a "routing split" variable), which rewards spreading replicas.
- Because w is 0 inside a node, the GPU-level ILP ``x[e, g]`` is solved exactly at node
  level (``X[e, n]`` replicas of e on node n, at most one per GPU when counts allow, each
  node exactly slots_per_gpu * gpus_per_node slots), plus the optional load-balance row
  per node (tolerance = ``problem.balance_tolerance``; dropped, and recorded,
  when it makes a layer infeasible). Inside a node, replicas go heaviest first to the
  lightest GPU with room (equal slots per GPU).
- Degenerate case, kept on purpose: with no redundancy and a uniform fabric every
  placement has the same expected traffic (each expert is remote for (N-1)/N of the
  tokens wherever it sits), so only the load row shapes the answer.

Solver: SCIP through OR-Tools' pywraplp (continuous routing variables rule out CP-SAT).
"""

from __future__ import annotations

import math
import time

import numpy as np
from ortools.linear_solver import pywraplp

from scheduler.placement.methods.replicas import copy_caps, pack, replica_counts
from scheduler.placement.methods.trivial import uniform_shares
from scheduler.placement.placement import Placement
from scheduler.placement.problem import PlacementProblem, PlacementResult, combined_layer_status


def _solve_layer_nodes(
    load: np.ndarray,
    counts: np.ndarray,
    per_gpu_cap: np.ndarray,
    cost: np.ndarray,
    gpus_per_node: int,
    slots_per_gpu: int,
    tolerance: float | None,
    time_limit_s: float,
    seed: int,
) -> tuple[np.ndarray | None, float, float, str]:
    """Node-level ILP of one layer.

    load [experts]; counts [experts] replicas; per_gpu_cap [experts]; cost [nodes, nodes]
    link cost source -> host. Returns (X [experts, nodes] or None, objective, bound, status).
    """
    experts, nodes = len(load), cost.shape[0]
    src = load / nodes  # [experts] tokens each node sends to e (round-robin sources)
    solver = pywraplp.Solver.CreateSolver("SCIP")
    solver.SetTimeLimit(max(1, int(time_limit_s * 1000)))
    solver.SetSolverSpecificParametersAsString(f"randomization/randomseedshift = {seed}\n")
    inf = solver.infinity()
    # Variables: replicas of e on node n.
    x = [
        [
            solver.IntVar(0, int(min(counts[e], per_gpu_cap[e] * gpus_per_node)), "")
            for _ in range(nodes)
        ]
        for e in range(experts)
    ]
    objective = solver.Objective()
    host_cost = cost.sum(axis=0)  # [nodes] summed over sources
    for e in range(experts):
        # Every replica of e is placed.
        row = solver.RowConstraint(int(counts[e]), int(counts[e]), "")
        for n in range(nodes):
            row.SetCoefficient(x[e][n], 1)
        if counts[e] == 1:
            # One replica: every source reaches it on its node, linear in x.
            for n in range(nodes):
                objective.SetCoefficient(x[e][n], float(src[e] * host_cost[n]))
            continue
        # Replicated: z[m] = e present on node m; each source s is served by y[s][m].
        z = [solver.BoolVar("") for _ in range(nodes)]
        for m in range(nodes):
            _le(solver, z[m], x[e][m])
        for s in range(nodes):
            y = [solver.NumVar(0, 1, "") for _ in range(nodes)]
            one = solver.RowConstraint(1, 1, "")
            for m in range(nodes):
                one.SetCoefficient(y[m], 1)
                _le(solver, y[m], z[m])
                objective.SetCoefficient(y[m], float(src[e] * cost[s, m]))
    # Equal slots: every node holds exactly its GPUs' slots.
    for n in range(nodes):
        row = solver.RowConstraint(slots_per_gpu * gpus_per_node, slots_per_gpu * gpus_per_node, "")
        for e in range(experts):
            row.SetCoefficient(x[e][n], 1)
    # Optional load-balance row: node load within (1 + tolerance) of the mean.
    if tolerance is not None:
        per_replica = load / counts
        cap = (1 + tolerance) * load.sum() / nodes
        for n in range(nodes):
            row = solver.RowConstraint(-inf, float(cap), "")
            for e in range(experts):
                row.SetCoefficient(x[e][n], float(per_replica[e]))
    objective.SetMinimization()
    status = solver.Solve()
    if status not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        return None, math.nan, math.nan, "INFEASIBLE" if status == solver.INFEASIBLE else "NONE"
    placed = np.array([[round(v.solution_value()) for v in row] for row in x], dtype=np.int64)
    return (
        placed,
        objective.Value(),
        objective.BestBound(),
        "OPTIMAL" if status == pywraplp.Solver.OPTIMAL else "FEASIBLE",
    )


def _le(solver: pywraplp.Solver, a: pywraplp.Variable, b: pywraplp.Variable) -> None:
    """a <= b."""
    row = solver.RowConstraint(-solver.infinity(), 0, "")
    row.SetCoefficient(a, 1)
    row.SetCoefficient(b, -1)


def pack_node_gpus(
    per_node: np.ndarray,
    load: np.ndarray,
    cap: np.ndarray,
    gpus_per_node: int,
    slots_per_gpu: int,
) -> np.ndarray:
    """Replicas per node -> phy2log row [slots].

    per_node [experts, nodes] replica counts; load [experts] per-replica load; cap
    [experts] copies one GPU may hold. Inside each node: heaviest replica first, to the
    lightest GPU with room (a round-robin deal if that greedy gets stuck).
    """
    experts, nodes = per_node.shape
    rows = []
    for n in range(nodes):
        items = np.repeat(np.arange(experts), per_node[:, n])
        rows += pack(items, load, cap, gpus_per_node, slots_per_gpu)
    return np.concatenate(rows).astype(np.int64)


def _dealt(counts: np.ndarray, nodes: int, gpus_per_node: int) -> np.ndarray:
    """[experts, nodes] replicas when all replicas, expert by expert, are dealt to the
    GPUs in turn (always meets equal slots and the per-GPU copy cap)."""
    gpu = np.arange(int(counts.sum())) % (nodes * gpus_per_node)
    out = np.zeros((len(counts), nodes), dtype=np.int64)
    np.add.at(out, (np.repeat(np.arange(len(counts)), counts), gpu // gpus_per_node), 1)
    return out


def _expert_cost(per_node: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """[experts] link cost summed over source nodes, each served by its cheapest host."""
    big = np.where(per_node[:, None, :] > 0, cost[None], np.inf)  # [experts, src, host]
    return big.min(axis=2).sum(axis=1)


def solve(problem: PlacementProblem) -> PlacementResult:
    start = time.perf_counter()
    m, t = problem.profile.model, problem.topology
    weight = problem.demand.sum(axis=0)  # [layers, experts]
    counts = replica_counts(weight, problem.num_slots)
    cap = copy_caps(counts, t.num_gpus)
    layers = m.num_moe_layers
    deadline = start + problem.time_limit_s
    phy2log = np.empty((layers, problem.num_slots), dtype=np.int64)
    objective = bound = 0.0
    statuses: list[str] = []
    relaxed: list[int] = []
    for layer in range(layers):
        load = weight[layer]
        # This layer's share of the time left, for both attempts together.
        layer_end = time.perf_counter() + (deadline - time.perf_counter()) / (layers - layer)
        solved: tuple[np.ndarray | None, float, float, str] = (None, 0.0, 0.0, "")
        for tolerance in (problem.balance_tolerance, None):
            left = layer_end - time.perf_counter()
            if tolerance is None:
                left = max(left, 1.0)  # the row-free attempt always gets a second
            solved = _solve_layer_nodes(
                load,
                counts[layer],
                cap[layer],
                t.link_cost,
                t.gpus_per_node,
                problem.slots_per_gpu,
                tolerance,
                left,
                problem.seed,
            )
            if solved[0] is not None:
                if tolerance is None:
                    relaxed.append(layer)
                break
        per_node, obj, bnd, status = solved
        if per_node is None:  # no solution within the time limit: deal replicas round-robin
            per_node = _dealt(counts[layer], t.nodes, t.gpus_per_node)
            obj = float((load / t.nodes) @ _expert_cost(per_node, t.link_cost))
            bnd, status = 0.0, "FALLBACK"
        objective += obj
        bound += bnd
        statuses.append(status)
        per_replica = load / counts[layer]
        phy2log[layer] = pack_node_gpus(
            per_node, per_replica, cap[layer], t.gpus_per_node, problem.slots_per_gpu
        )
    status = combined_layer_status(statuses)
    return PlacementResult(
        method="paper-a",
        placement=Placement(phy2log, m.num_experts, t.num_gpus, t.gpus_per_node),
        class_to_node_share=uniform_shares(problem),
        status=status,
        solve_seconds=time.perf_counter() - start,
        objective=objective,
        bound=min(bound, objective),
        details={
            "objective_units": "expected link-cost-weighted remote (token, expert) hits, "
            "round-robin sources, nearest replica",
            "solver": "SCIP (pywraplp), node-level per layer",
            "layers_optimal": sum(s == "OPTIMAL" for s in statuses),
            "load_row_tolerance": problem.balance_tolerance,
            "layers_without_load_row": relaxed,
            "replicas_per_expert": [int(counts.min()), int(counts.max())],
        },
    )
