"""MoETuner (Go & Mahajan, arXiv 2502.06643): two ILPs, written from docs/sources.md.

- **ILP1, load-balanced clustering (per layer):** the layer's expert replicas go into as
  many clusters as GPUs; minimise ``sum_k |cluster load - mean load|`` (linearised).
  Deviation forced by SGLang: every cluster holds *exactly* ``slots_per_gpu`` replicas
  (MoETuner only asks for non-empty clusters and equal experts per GPU summed over
  layers). At most one replica of an expert per cluster (unless an expert has more
  replicas than there are GPUs). Solved with CP-SAT, warm-started from the
  heaviest-first greedy packing, which is kept (status FALLBACK) when CP-SAT returns
  nothing within the layer's time.
- **ILP2, cluster-to-GPU assignment:** MoETuner minimises the largest GPU-pair
  communication cost of tokens moving from layer l to layer l + 1, from a profiled
  expert-to-expert transition matrix. Our profiles hold per-layer counts only, so the
  transition matrix is a **proxy**: tokens of one request class route independently
  across layers, ``T_l[i, j] = sum_c demand_c[l, i] * demand_c[l + 1, j] / tokens_c``.
  With a single class the proxy is rank one and ILP2 is nearly degenerate (balanced
  clusters exchange about the same traffic whatever the assignment). ILP2 is solved
  layer by layer (layer 0's clusters keep their order; each next layer is assigned
  given the previous one) as an exact bottleneck assignment: the smallest achievable
  largest pair cost, then the smallest total among assignments reaching it, both with
  OR-Tools' linear sum assignment. Pair cost = tokens / bandwidth (intra-node GB/s, or
  inter-node GB/s divided by the topology's link cost).
- **Redundancy** (MoETuner has none): EPLB's replicate rule fixes replica counts first;
  replicas are the items ILP1 clusters (load = expert load / replicas).
- MoETuner does not route requests: round-robin shares.

Determinism: CP-SAT runs with ``random_seed = problem.seed`` and one worker, and
stops on *deterministic* time (the layer's share of ``time_limit_s``), with twice that
wall time as a safety net; a run that hits the wall limit may differ between machines.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from ortools.graph.python import linear_sum_assignment
from ortools.sat.python import cp_model

from scheduler.placement.methods.replicas import copy_caps, pack, replica_counts
from scheduler.placement.methods.trivial import uniform_shares
from scheduler.placement.placement import Placement
from scheduler.placement.problem import PlacementProblem, PlacementResult, combined_layer_status
from scheduler.placement.topology import Topology

#: Replica loads are scaled to integers summing to about this per layer (CP-SAT).
LOAD_SCALE = 10**7
#: Share of the time limit kept back for ILP2 and packing.
ILP2_RESERVE = 0.1


def balanced_clusters(
    items: np.ndarray,
    load: np.ndarray,
    cap: np.ndarray,
    clusters: int,
    size: int,
    time_limit_s: float,
    seed: int,
) -> tuple[list[list[int]], float, str]:
    """ILP1 for one layer.

    items [n] expert ids of the replicas (n = clusters * size); load [experts] load per
    replica; cap [experts] copies one cluster may hold. Returns (clusters of expert ids,
    lower bound on sum_k |load_k - mean| in load units, CP-SAT status name).
    """
    hint = pack(items, load, cap, clusters, size)
    if size == 1 or load.sum() <= 0:
        return hint, _deviation(hint, load), "OPTIMAL"  # nothing to balance
    if time_limit_s <= 0:  # the time limit is spent: keep the warm start
        return hint, 0.0, "FALLBACK"
    scale = LOAD_SCALE / load[items].sum()
    weight = np.rint(load * scale).astype(np.int64)  # [experts] per replica, scaled
    total = int(weight[items].sum())
    model = cp_model.CpModel()
    # x[i][k]: replica i is in cluster k.
    x = [[model.new_bool_var("") for _ in range(clusters)] for _ in items]
    for row in x:  # every replica in exactly one cluster
        model.add_exactly_one(row)
    for k in range(clusters):  # equal cluster sizes (SGLang: equal slots per GPU)
        model.add(sum(x[i][k] for i in range(len(items))) == size)
    for e in np.unique(items):  # copies of an expert spread over clusters
        mine = np.flatnonzero(items == e)
        if len(mine) > cap[e]:
            for k in range(clusters):
                model.add(sum(x[i][k] for i in mine) <= int(cap[e]))
    loads = [sum(int(weight[e]) * x[i][k] for i, e in enumerate(items)) for k in range(clusters)]
    # dev[k] >= |clusters * load_k - total|, i.e. clusters * |load_k - mean|.
    dev = [model.new_int_var(0, clusters * total, "") for _ in range(clusters)]
    for k in range(clusters):
        model.add(dev[k] >= clusters * loads[k] - total)
        model.add(dev[k] >= total - clusters * loads[k])
    model.minimize(sum(dev))
    # Hint: the greedy packing, its clusters matched to items in order.
    free: dict[int, list[int]] = {}
    for k, members in enumerate(hint):
        for e in members:
            free.setdefault(e, []).append(k)
    for i, e in enumerate(items.tolist()):
        k_hint = free[e].pop()
        for k in range(clusters):
            model.add_hint(x[i][k], k == k_hint)
    for k, members in enumerate(hint):
        model.add_hint(dev[k], abs(clusters * int(weight[members].sum()) - total))

    solver = cp_model.CpSolver()
    solver.parameters.random_seed = seed
    # One worker: deterministic. (Interleaved multi-worker search is deterministic too,
    # but in OR-Tools 9.15 it runs on to the time limit after proving optimality.)
    solver.parameters.num_workers = 1
    solver.parameters.max_deterministic_time = max(time_limit_s, 0.05)
    solver.parameters.max_time_in_seconds = max(2 * time_limit_s, 0.1)
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return hint, 0.0, "FALLBACK"
    out: list[list[int]] = [[] for _ in range(clusters)]
    for i, e in enumerate(items.tolist()):
        out[next(k for k in range(clusters) if solver.boolean_value(x[i][k]))].append(e)
    bound = max(0.0, solver.best_objective_bound / clusters / scale)
    return out, bound, solver.status_name(status)


def _deviation(clusters: list[list[int]], load: np.ndarray) -> float:
    """sum_k |load_k - mean| of clusters of expert ids."""
    loads = np.array([load[c].sum() for c in clusters])
    return float(np.abs(loads - loads.mean()).sum())


def pair_cost(topology: Topology) -> np.ndarray:
    """[gpus, gpus] cost of one token between two GPUs: 1 / bandwidth, 0 on the diagonal."""
    node = topology.node_of_gpu()
    cost = topology.link_cost[node[:, None], node[None, :]] / topology.inter_node_gbps
    cost[node[:, None] == node[None, :]] = 1 / topology.intra_node_gbps
    np.fill_diagonal(cost, 0.0)
    return cost


def assign_clusters(traffic: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, float]:
    """ILP2 for one layer: bottleneck assignment of this layer's clusters to GPUs.

    traffic [gpus, clusters] proxy tokens from the previous layer's GPU a to cluster k;
    cost [gpus, gpus]. Returns (gpu of every cluster [clusters], the largest pair cost).
    """
    gpus = cost.shape[0]
    # worst[k, b]: largest pair cost into GPU b if cluster k sits on b.
    worst = np.stack([(traffic * cost[:, b][:, None]).max(axis=0) for b in range(gpus)], axis=1)
    top = worst.max()
    if top <= 0:
        return np.arange(gpus), 0.0
    scaled = np.rint(worst / top * 10**9).astype(np.int64)
    levels = np.unique(scaled)
    lo, hi = 0, len(levels) - 1  # the smallest level that admits a perfect assignment
    while lo < hi:
        mid = (lo + hi) // 2
        if _assignment(scaled, levels[mid]) is None:
            lo = mid + 1
        else:
            hi = mid
    best = _assignment(scaled, levels[lo])
    assert best is not None, "the largest level admits every arc"
    return best, float(levels[lo]) * top / 10**9


def _assignment(cost: np.ndarray, threshold: int) -> np.ndarray | None:
    """Min-total assignment (rows to columns) using arcs with cost <= threshold."""
    rows, cols = np.nonzero(cost <= threshold)
    lsa = linear_sum_assignment.SimpleLinearSumAssignment()
    lsa.add_arcs_with_cost(rows, cols, cost[rows, cols])
    if lsa.solve() != lsa.OPTIMAL:
        return None
    return np.array([lsa.right_mate(k) for k in range(cost.shape[0])], dtype=np.int64)


def _class_load(groups: list[list[int]], demand: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[classes, groups] load of each class on each group of expert ids (replica share)."""
    share = demand / counts  # [classes, experts]
    return np.stack([share[:, g].sum(axis=1) for g in groups], axis=1)


def solve(problem: PlacementProblem) -> PlacementResult:
    start = time.perf_counter()
    m, t = problem.profile.model, problem.topology
    demand = problem.demand  # [classes, layers, experts]
    weight = demand.sum(axis=0)
    counts = replica_counts(weight, problem.num_slots)
    caps = copy_caps(counts, t.num_gpus)
    layers, gpus, size = m.num_moe_layers, t.num_gpus, problem.slots_per_gpu
    deadline = start + problem.time_limit_s * (1 - ILP2_RESERVE)

    # ILP1 per layer.
    clusters: list[list[list[int]]] = []
    objective = bound = 0.0
    statuses: list[str] = []
    for layer in range(layers):
        per_replica = weight[layer] / counts[layer]
        items = np.repeat(np.arange(m.num_experts), counts[layer])
        budget = max(0.0, deadline - time.perf_counter()) / (layers - layer)
        groups, lb, status = balanced_clusters(
            items, per_replica, caps[layer], gpus, size, budget, problem.seed
        )
        clusters.append(groups)
        objective += _deviation(groups, per_replica)
        bound += lb
        statuses.append(status)

    # ILP2 layer by layer on the class-independence transition proxy.
    cost = pair_cost(t)
    phy2log = np.empty((layers, problem.num_slots), dtype=np.int64)
    phy2log[0] = np.concatenate(clusters[0])
    worst: list[float] = []
    identity_worst: list[float] = []
    for layer in range(1, layers):
        prev = [list(r) for r in phy2log[layer - 1].reshape(gpus, size)]
        tokens = demand[:, layer - 1].sum(axis=1) / m.top_k  # [classes]
        a = _class_load(prev, demand[:, layer - 1], counts[layer - 1])  # [classes, gpus]
        b = _class_load(clusters[layer], demand[:, layer], counts[layer])  # [classes, clusters]
        inv = np.divide(1.0, tokens, out=np.zeros_like(tokens), where=tokens > 0)
        traffic = a.T @ (b * inv[:, None])  # [gpus, clusters]
        gpu_of, top = assign_clusters(traffic, cost)
        worst.append(top)
        identity_worst.append(float((traffic * cost).max()))
        order = np.argsort(gpu_of)  # cluster held by each GPU
        phy2log[layer] = np.concatenate([clusters[layer][k] for k in order])

    status = combined_layer_status(statuses)
    details: dict[str, Any] = {
        "objective_units": "ILP1: sum over layers and GPUs of |GPU load - mean| (tokens)",
        "ilp1_layers_optimal": sum(s == "OPTIMAL" for s in statuses),
        "ilp2_transitions": "proxy: within-class independence across layers "
        f"({len(problem.class_names)} class(es)); no expert-to-expert transitions in profiles",
        "ilp2_max_pair_cost": float(max(worst, default=0.0)),
        "ilp2_max_pair_cost_identity": float(max(identity_worst, default=0.0)),
        "replicas_per_expert": [int(counts.min()), int(counts.max())],
    }
    return PlacementResult(
        method="moetuner",
        placement=Placement(phy2log, m.num_experts, gpus, t.gpus_per_node),
        class_to_node_share=uniform_shares(problem),
        status=status,
        solve_seconds=time.perf_counter() - start,
        objective=objective,
        bound=min(bound, objective),
        details=details,
    )
