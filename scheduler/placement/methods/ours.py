"""Our method: joint class-to-node shares and expert placement.

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
from scheduler.placement.metrics import gpu_loads, node_demand
from scheduler.placement.placement import Placement
from scheduler.placement.problem import PlacementProblem, PlacementResult, balanced_class_shares

ROUNDS = 3
#: Above this many expert-GPU binaries per layer the CP-SAT step is skipped (heuristic).
MAX_CPSAT_BINARIES = 4096
#: Integer scale: node demands are scaled so the largest becomes about this.
DEMAND_SCALE = 100_000
COST_SCALE = 100


@dataclass
class _LayerSolution:
    row: np.ndarray  # [slots] logical expert per physical slot
    cost: float  # in demand units (unscaled), weighted by link cost
    bound: float
    status: str


# ----------------------------------------------------------------------------- heuristic


def _layer_cost(
    dem: np.ndarray, row: np.ndarray, spg: int, g_per_node: int, link_cost: np.ndarray
) -> float:
    """Weighted remote demand of one layer. dem [nodes, experts]; row [slots]."""
    nodes, experts = dem.shape
    node_of_slot = np.arange(len(row)) // spg // g_per_node
    reps = np.zeros((experts, nodes))
    np.add.at(reps, (row, node_of_slot), 1)
    local = reps > 0  # [experts, nodes]
    mean_cost = (reps @ link_cost.T) / reps.sum(axis=1, keepdims=True)  # [experts, src nodes]
    return float((dem * ~local.T * mean_cost.T).sum())


def replica_counts(dem: np.ndarray, slots: int) -> np.ndarray:
    """[experts] replicas per expert: one each, then the redundant slots go to the largest
    marginal locality gains (the k-th replica of e makes e local to the node with the k-th
    largest demand for it). At most one replica per node. dem: [nodes, experts]."""
    nodes, experts = dem.shape
    k = np.ones(experts, dtype=np.int64)
    spare = slots - experts
    if spare <= 0:
        return k
    ranked = -np.sort(-dem, axis=0)  # [nodes, experts], k-th row = k-th largest demand
    gains = [(float(ranked[r, e]), -e, r) for e in range(experts) for r in range(1, nodes)]
    gains.sort(reverse=True)
    for _, neg_e, _ in gains[:spare]:
        k[-neg_e] += 1
    return k


def _replica_load(dem: np.ndarray, e: int, holders: list[int], n: int) -> float:
    """Expected load of e's replica on node n under static dispatch: node n's own demand
    plus an even share of the demand of nodes holding no replica of e."""
    remote = sum(dem[m, e] for m in range(dem.shape[0]) if m not in holders)
    return float(dem[n, e] + remote / len(holders))


def _heuristic_layer(
    dem: np.ndarray,
    k: np.ndarray,
    spg: int,
    g_per_node: int,
    tol: float,
    current: np.ndarray | None,
) -> np.ndarray:
    """Greedy placement of one layer: each expert's replicas on the nodes that use it most,
    under node slot and load caps (hottest experts first), then LPT packing onto GPUs and
    balance-repair swaps. Returns row [slots]."""
    if current is not None:
        return current.copy()
    nodes, experts = dem.shape
    total = dem.sum(axis=0)
    cap = (1 + tol) * total.sum() / nodes
    free = np.full(nodes, g_per_node * spg)
    load = np.zeros(nodes)
    holders: list[list[int]] = [[] for _ in range(experts)]
    for e in np.argsort(-total, kind="stable"):
        for n in np.argsort(-dem[:, e], kind="stable"):
            if len(holders[e]) == k[e]:
                break
            if free[n] > 0:
                holders[e].append(int(n))
        while len(holders[e]) < k[e]:  # nodes it prefers are full: take any with room
            holders[e].append(
                int(next(n for n in np.argsort(load) if free[n] > 0 and n not in holders[e]))
            )
        for n in holders[e]:
            free[n] -= 1
            load[n] += _replica_load(dem, e, holders[e], n)
    _rebalance_nodes(dem, holders, load, cap)
    return _pack_gpus(dem, holders, spg, g_per_node, tol)


def _rebalance_nodes(
    dem: np.ndarray, holders: list[list[int]], load: np.ndarray, cap: float, max_iter: int = 500
) -> None:
    """Swap single-replica experts between the busiest node and others while it is over
    the cap, preferring swaps that bring it under the cap, then the least locality lost."""
    total = dem.sum(axis=0)
    for _ in range(max_iter):
        hot = int(np.argmax(load))
        if load[hot] <= cap:
            return
        single = np.array([len(h) == 1 for h in holders])
        home = np.array([h[0] if len(h) == 1 else -1 for h in holders])
        a = np.flatnonzero(single & (home == hot))
        b = np.flatnonzero(single & (home != hot) & (home >= 0))
        if not len(a) or not len(b):
            return
        delta = total[a][:, None] - total[b][None, :]  # load leaving the hot node
        other = home[b][None, :]
        new_max = np.maximum(load[hot] - delta, load[other] + delta)
        loss = (
            dem[hot, a][:, None]
            + dem[other, b[None, :]]
            - dem[other, a[:, None]]
            - dem[hot, b][None, :]
        )
        ok = (delta > 0) & (new_max < load[hot])
        if not ok.any():
            return
        score = np.where(ok, (new_max > cap) * 1e30 + loss, np.inf)
        i, j = np.unravel_index(int(np.argmin(score)), score.shape)
        ea, eb, target = int(a[i]), int(b[j]), int(other[0, j])
        holders[ea], holders[eb] = [target], [hot]
        load[hot] -= delta[i, j]
        load[target] += delta[i, j]


def _pack_gpus(
    dem: np.ndarray, holders: list[list[int]], spg: int, g_per_node: int, tol: float
) -> np.ndarray:
    """LPT with cardinality inside each node, then swaps that lower the busiest GPU."""
    nodes = dem.shape[0]
    gpus: list[list[int]] = [[] for _ in range(nodes * g_per_node)]
    gpu_load = np.zeros(nodes * g_per_node)
    item_load: dict[tuple[int, int], float] = {}
    for n in range(nodes):
        items = sorted(
            ((_replica_load(dem, e, h, n), e) for e, h in enumerate(holders) if n in h),
            reverse=True,
        )
        local = list(range(n * g_per_node, (n + 1) * g_per_node))
        for w, e in items:
            g = min((g for g in local if len(gpus[g]) < spg), key=lambda g: gpu_load[g])
            gpus[g].append(e)
            gpu_load[g] += w
            item_load[(e, n)] = w
    _repair_balance(gpus, gpu_load, item_load, g_per_node, tol)
    return np.array([e for es in gpus for e in es], dtype=np.int64)


def _repair_balance(
    gpus: list[list[int]],
    gpu_load: np.ndarray,
    item_load: dict[tuple[int, int], float],
    g_per_node: int,
    tol: float,
    max_iter: int = 2000,
) -> None:
    """Swap replicas between GPUs of the same node while the busiest GPU exceeds the cap."""
    cap = (1 + tol) * gpu_load.mean()
    for _ in range(max_iter):
        hot = int(np.argmax(gpu_load))
        if gpu_load[hot] <= cap:
            return
        node = hot // g_per_node
        mine = np.array([item_load[(e, node)] for e in gpus[hot]])
        best = None
        for g in range(node * g_per_node, (node + 1) * g_per_node):
            if g == hot or not gpus[g]:
                continue
            theirs = np.array([item_load[(e, node)] for e in gpus[g]])
            d = mine[:, None] - theirs[None, :]
            new_max = np.where(d > 0, np.maximum(gpu_load[hot] - d, gpu_load[g] + d), np.inf)
            i, j = np.unravel_index(int(np.argmin(new_max)), new_max.shape)
            if new_max[i, j] < gpu_load[hot] - 1e-9 and (best is None or new_max[i, j] < best[0]):
                best = (float(new_max[i, j]), g, int(i), int(j), float(d[i, j]))
        if best is None:
            return
        _, g_to, i_hot, j_to, d_best = best
        gpus[hot][i_hot], gpus[g_to][j_to] = gpus[g_to][j_to], gpus[hot][i_hot]
        gpu_load[hot] -= d_best
        gpu_load[g_to] += d_best


# ----------------------------------------------------------------------------- CP-SAT


def _solve_layer_cpsat(
    dem: np.ndarray,
    k: np.ndarray,
    spg: int,
    g_per_node: int,
    tol: float,
    link_cost: np.ndarray,
    hint: np.ndarray,
    time_limit: float,
    seed: int,
    workers: int,
    current: np.ndarray | None,
    max_moves: int | None,
) -> _LayerSolution:
    """One layer given node demands dem [nodes, experts] and replica counts k [experts].

    With at most one replica per node, SGLang's static dispatch is linear here: node n's
    demand for e goes to its own replica if it has one, otherwise evenly to e's k_e
    replicas, so every GPU load below is the exact expectation.
    """
    from ortools.sat.python import cp_model

    nodes, experts = dem.shape
    num_gpus = nodes * g_per_node
    slots = num_gpus * spg
    node_of = np.arange(num_gpus) // g_per_node
    scale = DEMAND_SCALE / max(float(dem.max()), 1e-12)
    d = np.rint(dem * scale).astype(np.int64)  # [nodes, experts]
    cost = np.rint(link_cost * COST_SCALE).astype(np.int64)
    uniform = bool(np.all(cost[~np.eye(nodes, dtype=bool)] == cost.max()))
    total = d.sum(axis=0)

    # --- variables: z[e, g] = a replica of e on GPU g; y[e, n] = node n holds e
    model = cp_model.CpModel()
    z = {(e, g): model.new_bool_var(f"z{e}_{g}") for e in range(experts) for g in range(num_gpus)}
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
    # --- GPU expert load within the tolerance (expected load under static dispatch)
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
    # --- objective: remote demand, weighted by the link cost to the serving replica
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
    # --- re-placement: at most max_moves replicas not already on their GPU
    if current is not None and max_moves is not None:
        cur = np.zeros((experts, num_gpus), dtype=bool)
        cur[current, np.arange(slots) // spg] = True
        model.add(
            sum(z[e, g] for e in range(experts) for g in range(num_gpus) if not cur[e, g])
            <= max_moves
        )
    model.minimize(sum(terms))
    # --- warm start from the heuristic
    hint_z = np.zeros((experts, num_gpus), dtype=bool)
    hint_z[hint, np.arange(slots) // spg] = True
    for (e, g), var in z.items():
        model.add_hint(var, bool(hint_z[e, g]))

    solver = cp_model.CpSolver()
    solver.parameters.max_deterministic_time = time_limit
    solver.parameters.max_time_in_seconds = 1.5 * time_limit  # wall-clock safety net
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    status = solver.solve(model)
    name = solver.status_name(status)
    unit = scale * COST_SCALE
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return _LayerSolution(hint, float("nan"), float("nan"), name)
    row = np.empty(slots, dtype=np.int64)
    for g in range(num_gpus):
        row[g * spg : (g + 1) * spg] = [e for e in range(experts) if solver.value(z[e, g])]
    return _LayerSolution(
        row, solver.objective_value / unit, solver.best_objective_bound / unit, name
    )


# ----------------------------------------------------------------------------- large


def _layer_gpu_loads(
    dem: np.ndarray, row: np.ndarray, num_gpus: int, g_per_node: int
) -> np.ndarray:
    """[gpus] expected loads of one layer under static dispatch (metrics.gpu_loads)."""
    experts = dem.shape[1]
    placement = Placement(row[None, :], experts, num_gpus, g_per_node)
    return gpu_loads(dem[:, None, :], placement)[0]


def _locality_swaps(
    dem: np.ndarray,
    row: np.ndarray,
    spg: int,
    g_per_node: int,
    deadline: float,
    max_swaps: int = 400,
) -> np.ndarray:
    """Lower the layer's busiest GPU by swapping single-replica experts, then improve
    locality by swaps between nodes that do not raise the busiest GPU load again (so
    balancedness never drops below the start's). Stops at ``deadline``.

    A single-replica expert's load is its whole demand wherever it sits, so a swap moves
    exactly that load; replicated experts stay put.
    """
    nodes, experts = dem.shape
    num_gpus = len(row) // spg
    row = row.copy()
    counts = np.bincount(row, minlength=experts)
    loads = _layer_gpu_loads(dem, row, num_gpus, g_per_node)
    total = dem.sum(axis=0)
    slot_gpu = np.arange(len(row)) // spg
    # first lower the busiest GPU (its load depends on where each node's requests run)
    for _ in range(max_swaps):
        hot = int(np.argmax(loads))
        mine = np.flatnonzero((slot_gpu == hot) & (counts[row] == 1))
        theirs = np.flatnonzero((slot_gpu != hot) & (counts[row] == 1))
        if not len(mine) or not len(theirs):
            break
        delta = total[row[mine]][:, None] - total[row[theirs]][None, :]
        new_max = np.maximum(loads[hot] - delta, loads[slot_gpu[theirs]][None, :] + delta)
        new_max = np.where(delta > 0, new_max, np.inf)
        i, j = np.unravel_index(int(np.argmin(new_max)), new_max.shape)
        if new_max[i, j] >= loads[hot] - 1e-9:
            break
        si, sj = mine[i], theirs[j]
        loads[hot] -= delta[i, j]
        loads[slot_gpu[sj]] += delta[i, j]
        row[si], row[sj] = row[sj], row[si]
    ceiling = loads.max()
    for _ in range(max_swaps):
        if time.perf_counter() > deadline:
            break
        movable = np.flatnonzero(counts[row] == 1)  # slots holding single-replica experts
        e = row[movable]
        gpu = slot_gpu[movable]
        node = gpu // g_per_node
        # gain of swapping slot i with slot j: both experts become local to their new node
        gain = (
            dem[node[None, :], e[:, None]]
            + dem[node[:, None], e[None, :]]
            - dem[node[:, None], e[:, None]]
            - dem[node[None, :], e[None, :]]
        )
        delta = total[e][:, None] - total[e][None, :]  # load moving from gpu_i to gpu_j
        ok = (node[:, None] != node[None, :]) & (gain > 1e-9)
        ok &= loads[gpu][:, None] - delta <= ceiling + 1e-9
        ok &= loads[gpu][None, :] + delta <= ceiling + 1e-9
        if not ok.any():
            break
        i, j = np.unravel_index(int(np.argmax(np.where(ok, gain, -np.inf))), gain.shape)
        si, sj = movable[i], movable[j]
        loads[gpu[i]] -= delta[i, j]
        loads[gpu[j]] += delta[i, j]
        row[si], row[sj] = row[sj], row[si]
    return row


def _large_layers(
    nd: np.ndarray, rows: np.ndarray | None, slots: int, spg: int, g_per_node: int, budget_s: float
) -> np.ndarray:
    """Layers too large for CP-SAT: EPLB's balanced placement of the total demand (the
    first round) or the previous round's rows, then load-safe locality swaps."""
    from scheduler.placement.methods.eplb import rebalance_experts

    nodes, layers, experts = nd.shape
    if rows is None:
        rows, _, _ = rebalance_experts(
            nd.sum(axis=0), slots, 1, 1, nodes * g_per_node, hierarchical=False
        )
    deadline = time.perf_counter() + budget_s
    out = np.empty_like(rows)
    for layer in range(layers):
        layer_deadline = time.perf_counter() + (deadline - time.perf_counter()) / (layers - layer)
        out[layer] = _locality_swaps(nd[:, layer, :], rows[layer], spg, g_per_node, layer_deadline)
    return out


# ----------------------------------------------------------------------------- x step


def _solve_shares(class_cost: np.ndarray, weights: np.ndarray, tol: float) -> np.ndarray:
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


def _class_costs(
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


def solve(problem: PlacementProblem) -> PlacementResult:
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
            "our method keeps at most one replica of an expert per node"
        )
    current = problem.current.phy2log if problem.current is not None else None
    moves_left = problem.max_moves

    shares = balanced_class_shares(weights, t.nodes)
    history = []
    rows = np.zeros((m.num_moe_layers, slots), dtype=np.int64)
    bounds = np.zeros(m.num_moe_layers)
    statuses: list[str] = []
    for round_ in range(ROUNDS):
        nd = node_demand(demand, shares)  # [nodes, layers, experts]
        statuses = []
        if not use_cpsat:
            rows = _large_layers(
                nd, rows if round_ else current, slots, spg, g, problem.time_limit_s / ROUNDS
            )
            statuses = ["HEURISTIC"] * m.num_moe_layers
            bounds[:] = np.nan
        for layer in range(m.num_moe_layers if use_cpsat else 0):
            # CP-SAT's deterministic time (not wall time) keeps runs reproducible
            layer_budget = problem.time_limit_s / (ROUNDS * m.num_moe_layers)
            dem = nd[:, layer, :]
            cur = None if current is None else current[layer]
            k = (
                np.bincount(cur, minlength=m.num_experts)
                if cur is not None
                else replica_counts(dem, slots)
            )
            hint = _heuristic_layer(dem, k, spg, g, problem.balance_tolerance, cur)
            layer_moves = None
            if moves_left is not None:
                layer_moves = moves_left // (m.num_moe_layers - layer)
            sol = _solve_layer_cpsat(
                dem,
                k,
                spg,
                g,
                problem.balance_tolerance,
                t.link_cost,
                hint,
                layer_budget,
                problem.seed,
                problem.workers,
                cur,
                layer_moves,
            )
            statuses.append(sol.status)
            rows[layer], bounds[layer] = sol.row, sol.bound
        cost = float(
            sum(
                _layer_cost(nd[:, j, :], rows[j], spg, g, t.link_cost)
                for j in range(m.num_moe_layers)
            )
        )
        history.append({"round": round_, "cost": cost, "shares": shares.round(4).tolist()})
        new_shares = _solve_shares(
            _class_costs(demand, rows, spg, g, t.link_cost), weights, problem.balance_tolerance
        )
        if np.allclose(new_shares, shares, atol=1e-6) or round_ == ROUNDS - 1:
            break
        new_cost = float((_class_costs(demand, rows, spg, g, t.link_cost) * new_shares).sum())
        if new_cost >= cost - 1e-9:
            break
        shares = new_shares
    if moves_left is not None and current is not None:
        placement_moves = Placement(rows, m.num_experts, t.num_gpus, g).moves_from(
            problem.current  # type: ignore[arg-type]
        )
        history.append({"moves": placement_moves})
    infeasible = [s for s in statuses if s == "INFEASIBLE"]
    if infeasible:
        raise ConfigError(
            f"{len(infeasible)} layer(s) have no placement with every GPU's expert load within "
            f"+{problem.balance_tolerance:.0%} of the mean"
            + (f" and at most {problem.max_moves} moves" if problem.max_moves is not None else "")
            + ": loosen --balance-tolerance, add --redundant-experts"
            + (" or allow more --max-moves" if problem.max_moves is not None else "")
        )
    status = (
        "OPTIMAL"
        if statuses and all(s == "OPTIMAL" for s in statuses)
        else "HEURISTIC"
        if all(s == "HEURISTIC" for s in statuses)
        else "FEASIBLE"
    )
    return PlacementResult(
        method="ours",
        placement=Placement(rows, m.num_experts, t.num_gpus, g),
        class_to_node_share=shares,
        status=status,
        solve_seconds=time.perf_counter() - start,
        objective=cost,
        bound=float(bounds.sum()) if use_cpsat and not np.isnan(bounds).any() else None,
        details={
            "rounds": history,
            "layer_status": {s: statuses.count(s) for s in set(statuses)},
            "objective_units": "expected remote (token, expert) hits x link cost, over the "
            "profile's counts",
            "bound_scope": "sum of per-layer CP-SAT bounds given the final class shares",
        },
    )
