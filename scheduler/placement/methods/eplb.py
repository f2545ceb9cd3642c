"""DeepSeek EPLB (``deepseek-ai/EPLB``), written in numpy from its description.

Peer baseline (docs/placement-peers.md): balances expert load over GPUs with redundant
experts; it knows neither link costs nor request classes. The entry point
:func:`rebalance_experts` reproduces SGLang 0.5.23's
``sglang/srt/eplb/eplb_algorithms/deepseek.py`` exactly, including its numerics:

- loads are cast to float32 (``weight.float()``); per-replica loads are float32
  quotients; the greedy packing adds float32 loads in Python floats (float64);
- every descending sort breaks ties as ``torch.sort`` on CPU does: torch calls
  libstdc++'s ``std::sort`` (introsort, not stable), emulated by :func:`_std_sort_desc`;
- ``max(dim=-1).indices`` returns the first maximum, as ``argmax`` does.

One documented difference: an expert group's load (hierarchical policy only) is the
float32 rounding of the exact sum, whereas torch adds 32 float32 values in an order
that depends on the CPU's SIMD width (AVX2 vs AVX512). The two differ only when a group
load exceeds 2**24 tokens and then by a few units in the last place, which changes the
answer only if two groups' loads are that close (never on the DeepSeek-V3 statistics;
tests/test_placement_eplb.py compares both on them).

Pure: arrays in, arrays out.
"""

from __future__ import annotations

import time

import numpy as np

from scheduler.errors import ConfigError
from scheduler.model_shape import ModelShape
from scheduler.placement.methods.trivial import uniform_shares
from scheduler.placement.placement import Placement
from scheduler.placement.problem import PlacementProblem, PlacementResult

#: Expert groups of group-limited routing (HF config ``n_group``), which SGLang passes to
#: EPLB as ``num_groups``. Our ModelShape has no such field, so known models are listed
#: here; other models get :data:`DEFAULT_NUM_GROUPS` when it divides their experts.
NUM_GROUPS: dict[str, int | None] = {
    "deepseek-v3": 8,
    "deepseek-v2-lite": 1,
    "mixtral-8x7b": None,
    "qwen3-235b-a22b": None,
}
DEFAULT_NUM_GROUPS = 8

_INSERTION_THRESHOLD = 16  # libstdc++ _S_threshold


# --------------------------------------------------------------------- torch.sort on CPU


def _std_sort_desc(values: list[float]) -> list[int]:
    """Indices of ``values`` sorted descending exactly as libstdc++'s ``std::sort``
    orders them (what ``torch.sort(descending=True)`` does on CPU; ties unstable)."""
    v = list(values)
    ix = list(range(len(v)))

    def swap(a: int, b: int) -> None:
        v[a], v[b] = v[b], v[a]
        ix[a], ix[b] = ix[b], ix[a]

    def adjust_heap(first: int, hole: int, length: int, val: float, vi: int) -> None:
        top, child = hole, hole
        while child < (length - 1) // 2:
            child = 2 * (child + 1)
            if v[first + child] > v[first + child - 1]:  # comp(child, child - 1)
                child -= 1
            v[first + hole], ix[first + hole] = v[first + child], ix[first + child]
            hole = child
        if length % 2 == 0 and child == (length - 2) // 2:
            child = 2 * (child + 1)
            v[first + hole], ix[first + hole] = v[first + child - 1], ix[first + child - 1]
            hole = child - 1
        parent = (hole - 1) // 2
        while hole > top and v[first + parent] > val:  # comp(parent, value)
            v[first + hole], ix[first + hole] = v[first + parent], ix[first + parent]
            hole = parent
            parent = (hole - 1) // 2
        v[first + hole], ix[first + hole] = val, vi

    def heap_sort(first: int, last: int) -> None:  # std::__partial_sort(first, last, last)
        length = last - first
        if length >= 2:
            for parent in range((length - 2) // 2, -1, -1):
                adjust_heap(first, parent, length, v[first + parent], ix[first + parent])
        while last - first > 1:
            last -= 1
            val, vi = v[last], ix[last]
            v[last], ix[last] = v[first], ix[first]
            adjust_heap(first, 0, last - first, val, vi)

    def introsort(first: int, last: int, depth: int) -> None:
        while last - first > _INSERTION_THRESHOLD:
            if depth == 0:
                heap_sort(first, last)
                return
            depth -= 1
            # median of (first + 1, mid, last - 1) moved to first
            a, b, c = first + 1, first + (last - first) // 2, last - 1
            if v[a] > v[b]:
                if v[b] > v[c]:
                    swap(first, b)
                elif v[a] > v[c]:
                    swap(first, c)
                else:
                    swap(first, a)
            elif v[a] > v[c]:
                swap(first, a)
            elif v[b] > v[c]:
                swap(first, c)
            else:
                swap(first, b)
            # unguarded partition around v[first]
            lo, hi, pivot = first + 1, last, v[first]
            while True:
                while v[lo] > pivot:
                    lo += 1
                hi -= 1
                while pivot > v[hi]:
                    hi -= 1
                if not lo < hi:
                    break
                swap(lo, hi)
                lo += 1
            introsort(lo, last, depth)
            last = lo

    def linear_insert(i: int, guarded_first: int | None) -> None:
        val, vi = v[i], ix[i]
        if guarded_first is not None and val > v[guarded_first]:
            v[guarded_first + 1 : i + 1] = v[guarded_first:i]
            ix[guarded_first + 1 : i + 1] = ix[guarded_first:i]
            v[guarded_first], ix[guarded_first] = val, vi
            return
        j = i - 1
        while val > v[j]:
            v[j + 1], ix[j + 1] = v[j], ix[j]
            j -= 1
        v[j + 1], ix[j + 1] = val, vi

    n = len(v)
    if n > 1:
        introsort(0, n, 2 * (n.bit_length() - 1))
        head = min(n, _INSERTION_THRESHOLD)
        for i in range(1, head):
            linear_insert(i, 0)
        for i in range(head, n):
            linear_insert(i, None)
    return ix


def _sort_desc(row: np.ndarray) -> list[int]:
    """Descending order of a float32 row, tie-broken as torch.sort on CPU."""
    if np.unique(row).size == row.size:  # no ties: every correct sort agrees
        return np.argsort(-row, kind="stable").tolist()
    return _std_sort_desc(row.tolist())


# --------------------------------------------------------------------- the algorithm


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack the n items of every row into ``num_packs`` packs of exactly n / num_packs
    items each, heaviest first into the lightest pack that still has room.

    weight: [X, n]; returns pack_index [X, n], rank_in_pack [X, n] (int64).
    """
    rows, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        pack_index = np.broadcast_to(np.arange(n, dtype=np.int64), (rows, n)).copy()
        return pack_index, np.zeros((rows, n), dtype=np.int64)
    weight32 = weight.astype(np.float32)
    values = weight32.tolist()
    pack_index = np.full((rows, n), -1, dtype=np.int64)
    rank_in_pack = np.full((rows, n), -1, dtype=np.int64)
    for i in range(rows):
        pack_weights = [0.0] * num_packs
        pack_items = [0] * num_packs
        for item in _sort_desc(weight32[i]):
            pack = min(
                (j for j in range(num_packs) if pack_items[j] < per_pack),
                key=pack_weights.__getitem__,
            )
            pack_index[i, item] = pack
            rank_in_pack[i, item] = pack_items[pack]
            pack_weights[pack] += values[i][item]
            pack_items[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(
    weight: np.ndarray, num_phy: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replicate ``num_log`` experts into ``num_phy`` replicas, each extra replica going
    to the expert with the largest load per replica (minimises the largest replica load).

    weight: [X, num_log] float32; returns phy2log [X, num_phy], rank [X, num_phy] (the
    replica's index among its expert's replicas), logcnt [X, num_log] (int64).
    """
    rows, num_log = weight.shape
    phy2log = np.broadcast_to(np.arange(num_phy, dtype=np.int64), (rows, num_phy)).copy()
    rank = np.zeros((rows, num_phy), dtype=np.int64)
    logcnt = np.ones((rows, num_log), dtype=np.int64)
    r = np.arange(rows)
    for i in range(num_log, num_phy):
        hottest = (weight / logcnt.astype(np.float32)).argmax(axis=-1)
        phy2log[:, i] = hottest
        rank[:, i] = logcnt[r, hottest]
        logcnt[r, hottest] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse of permutations perm [X, n]."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.arange(perm.shape[1], dtype=perm.dtype)[None], axis=1)
    return inv


def rebalance_experts_hierarchical(
    weight: np.ndarray,
    num_physical_experts: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups to nodes, replicas within each node, replicas to the node's GPUs.

    weight: [layers, num_logical] float32. Returns phy2log [layers, num_physical],
    phyrank [layers, num_physical], logcnt [layers, num_logical].
    """
    layers, num_log = weight.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    per_gpu = num_physical_experts // num_gpus
    log_per_node = num_log // num_nodes

    # Step 1: pack expert groups to nodes; "mlog" numbers experts node by node.
    group_load = weight.reshape(layers, num_groups, group_size).sum(-1, dtype=np.float64)
    group_pack, group_rank = balanced_packing(group_load.astype(np.float32), num_nodes)
    log2mlog = (
        ((group_pack * groups_per_node + group_rank) * group_size)[:, :, None]
        + np.arange(group_size, dtype=np.int64)
    ).reshape(layers, num_log)
    mlog2log = _inverse(log2mlog)

    # Step 2: replicate experts within each node. [layers * nodes, num_log / nodes]
    mlog_load = np.take_along_axis(weight, mlog2log, -1).reshape(-1, log_per_node)
    phy2mlog, phyrank, mlogcnt = replicate_experts(mlog_load, num_physical_experts // num_nodes)

    # Step 3: pack each node's replicas onto its GPUs by load per replica.
    phy_load = np.take_along_axis(mlog_load / mlogcnt.astype(np.float32), phy2mlog, -1)
    pack_index, rank_in_pack = balanced_packing(phy_load, num_gpus // num_nodes)
    pphy2phy = _inverse(pack_index * per_gpu + rank_in_pack)

    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, -1)
    node_offset = np.arange(0, num_log, log_per_node, dtype=np.int64)[None, :, None]
    pphy2mlog = (pphy2mlog.reshape(layers, num_nodes, -1) + node_offset).reshape(layers, -1)
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, -1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, -1).reshape(layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(layers, -1), log2mlog, -1)
    return phy2log, pphyrank, logcnt


def rebalance_experts(
    weight: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    hierarchical: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's entry point.

    weight: [layers, num_logical] load statistics; num_replicas: physical experts per
    layer, a multiple of num_gpus. Policy: ``hierarchical=None`` picks EPLB's rule
    (hierarchical when ``num_groups % num_nodes == 0``, else global); global is the
    hierarchical policy with one group and one node.

    Returns phy2log [layers, num_replicas] (slot j on GPU j // (num_replicas / num_gpus)),
    log2phy [layers, num_logical, max_replicas] (-1 padded), logcnt [layers, num_logical].
    Raises ConfigError naming the constraint an input breaks.
    """
    weight = np.asarray(weight)
    if weight.ndim != 2:
        raise ConfigError(f"EPLB weight must be [layers, experts], got {weight.ndim}-D")
    if not np.all(np.isfinite(weight)):
        raise ConfigError("EPLB weight must be finite")
    weight = weight.astype(np.float32)
    layers, num_log = weight.shape
    if hierarchical is None:
        hierarchical = num_groups % num_nodes == 0
    if not hierarchical:
        num_groups, num_nodes = 1, 1
    _check(num_log, num_replicas, num_groups, num_nodes, num_gpus)
    phy2log, phyrank, logcnt = rebalance_experts_hierarchical(
        weight, num_replicas, num_groups, num_nodes, num_gpus
    )
    max_cnt = int(logcnt.max()) if logcnt.size else 1
    log2phy = np.full((layers, num_log, max_cnt), -1, dtype=np.int64)
    layer_idx = np.repeat(np.arange(layers), num_replicas)
    log2phy[layer_idx, phy2log.ravel(), phyrank.ravel()] = np.tile(
        np.arange(num_replicas, dtype=np.int64), layers
    )
    return phy2log, log2phy, logcnt


def _check(num_log: int, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> None:
    if min(num_log, num_groups, num_nodes, num_gpus) < 1:
        raise ConfigError("EPLB needs at least one expert, group, node and GPU")
    if num_replicas < num_log:
        raise ConfigError(f"EPLB: {num_replicas} physical slots cannot hold {num_log} experts")
    if num_replicas % num_gpus:
        raise ConfigError(
            f"EPLB: {num_replicas} physical slots do not split equally over {num_gpus} GPUs"
        )
    if num_gpus % num_nodes:
        raise ConfigError(f"EPLB: {num_gpus} GPUs do not split equally over {num_nodes} nodes")
    if num_log % num_groups:
        raise ConfigError(f"EPLB: {num_log} experts do not split into {num_groups} groups")
    if num_groups % num_nodes:
        raise ConfigError(
            f"EPLB hierarchical: {num_groups} expert groups do not split over {num_nodes} nodes"
        )


# --------------------------------------------------------------------- registry methods


def num_expert_groups(model: ModelShape) -> int | None:
    """Expert groups SGLang would pass to EPLB for ``model`` (None: no group routing)."""
    if model.name in NUM_GROUPS:
        return NUM_GROUPS[model.name]
    return DEFAULT_NUM_GROUPS if model.num_experts % DEFAULT_NUM_GROUPS == 0 else None


def _solve(problem: PlacementProblem, method: str, want_hierarchical: bool) -> PlacementResult:
    start = time.perf_counter()
    m, t = problem.profile.model, problem.topology
    weight = problem.demand.sum(axis=0)  # [layers, experts]
    details: dict[str, object] = {"num_replicas": problem.num_slots}
    groups = num_expert_groups(m)
    hierarchical = want_hierarchical
    if want_hierarchical:
        details["num_groups"] = groups
        if groups is None or groups % t.nodes or m.num_experts % groups:
            hierarchical = False
            details["fallback"] = (
                f"hierarchical needs expert groups divisible by the {t.nodes} nodes "
                f"(groups: {groups}); used the global policy, as SGLang's auto choice does"
            )
    details["policy"] = "hierarchical" if hierarchical else "global"
    phy2log, _, logcnt = rebalance_experts(
        weight, problem.num_slots, groups or 1, t.nodes, t.num_gpus, hierarchical
    )
    details["replicas_per_expert"] = [int(logcnt.min()), int(logcnt.max())]
    placement = Placement(phy2log, m.num_experts, t.num_gpus, t.gpus_per_node)
    return PlacementResult(
        method=method,
        placement=placement,
        class_to_node_share=uniform_shares(problem),
        status="HEURISTIC",
        solve_seconds=time.perf_counter() - start,
        details=details,
    )


def solve_global(problem: PlacementProblem) -> PlacementResult:
    """``eplb``: the global policy (one group, one node) on the total demand."""
    return _solve(problem, "eplb", want_hierarchical=False)


def solve_hierarchical(problem: PlacementProblem) -> PlacementResult:
    """``eplb-hierarchical``: groups to nodes first; global when groups % nodes != 0."""
    return _solve(problem, "eplb-hierarchical", want_hierarchical=True)
