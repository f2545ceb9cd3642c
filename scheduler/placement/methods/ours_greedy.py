"""Greedy parts of our method: replica counts, the per-layer heuristic that warm-starts
CP-SAT (and is its fallback), and the large-instance path (EPLB start, then balance and
locality swaps). Pure numpy.
"""

from __future__ import annotations

import time

import numpy as np

from scheduler.placement.metrics import gpu_loads
from scheduler.placement.placement import Placement

#: Above this many expert-GPU binaries per layer ``--objective remote-hits`` skips its
#: CP-SAT model (the large-instance path).
MAX_CPSAT_BINARIES = 4096


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


def heuristic_layer(
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
            room = [
                int(n)
                for n in np.argsort(load, kind="stable")
                if free[n] - holders[e].count(int(n)) > 0
            ]
            # a node without e if one has room, else (only slots on e's nodes are left)
            # a second replica on one of them
            holders[e].append(next((n for n in room if n not in holders[e]), room[0]))
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
            (
                (_replica_load(dem, e, h, n), e)
                for e, h in enumerate(holders)
                for _ in range(h.count(n))
            ),
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


def large_layers(
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
