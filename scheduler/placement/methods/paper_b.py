"""Paper B (Bambhaniya et al., arXiv 2604.23150): request groups + greedy ``U[d, e]``.

Written from the paper's §4.1-4.2 as docs/sources.md states them; docs/placement-peers.md
lists the choices.

- **Request groups:** the profile's classes are B's K request clusters (a profile built
  with ``--by cluster`` holds B's k-means clusters of L2-normalised decode activation
  vectors; a labelled profile holds task families). Device groups = the D nodes.
  K = D: one-to-one. D > K: larger classes get several groups (each extra group to the
  class with the most weight per group; its requests split evenly over them). K > D:
  k-means (seeded) on the classes' summed activations, each layer normalised to a
  distribution and the whole L2-normalised, gives D meta-clusters (a meta-cluster can
  come out empty when classes coincide; its node then serves no requests).
  ``class_to_node_share`` follows: B sends a request to its cluster's group.
- **Placement, per layer:** ``U[d, e]`` = tokens the requests of group d send to expert e.
  Stage 1 places every expert exactly once: (group, expert) pairs by ``U`` descending,
  each expert to its best group with unique-expert capacity left, capacities
  near-equal (``E // D`` or one more); equal ``U`` (a class split over several groups)
  goes to the group with the most room left, so a split class's experts alternate.
  Stage 2 fills a group's remaining slots (only with redundant experts) with its
  most-used experts it does not hold yet.
- **Inside a node** (B has node groups only): the node's experts by ``U`` descending are
  dealt round-robin over its GPUs, so each GPU gets exactly ``slots_per_gpu`` and the
  hottest experts land on different GPUs.

Objective reported: expected remote (token, expert) hits under B's own routing (tokens of
group d for experts not on node d); no bound.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from scheduler.placement.placement import Placement
from scheduler.placement.problem import PlacementProblem, PlacementResult


def activation_features(demand: np.ndarray) -> np.ndarray:
    """demand [classes, layers, experts] -> [classes, layers * experts]: each layer
    normalised to a distribution, then each row L2-normalised (paper B's vectors)."""
    sums = demand.sum(axis=2, keepdims=True)
    dist = np.divide(demand, sums, out=np.zeros_like(demand, dtype=np.float64), where=sums > 0)
    flat = dist.reshape(len(demand), -1)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    return np.divide(flat, norms, out=np.zeros_like(flat), where=norms > 0)


def group_classes(
    demand: np.ndarray, weights: np.ndarray, groups: int, seed: int = 0
) -> tuple[np.ndarray, str]:
    """Map K request classes to D device groups. Returns (share [classes, groups], rows sum
    to 1; the mapping rule: "one-to-one", "split" (D > K) or "meta-kmeans" (K > D))."""
    classes = len(weights)
    share = np.zeros((classes, groups))
    if classes == groups:
        share[np.arange(classes), np.arange(classes)] = 1.0
        return share, "one-to-one"
    if classes < groups:
        alloc = np.ones(classes, dtype=np.int64)
        for _ in range(groups - classes):  # next group to the most weight per group
            alloc[int(np.argmax(weights / alloc))] += 1
        first = np.concatenate([[0], np.cumsum(alloc)[:-1]])
        for c in range(classes):
            share[c, first[c] : first[c] + alloc[c]] = 1.0 / alloc[c]
        return share, "split"
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        # Coinciding classes give fewer distinct meta-clusters; empty groups are reported.
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = KMeans(n_clusters=groups, n_init=10, random_state=seed).fit_predict(
            activation_features(demand)
        )
    share[np.arange(classes), labels] = 1.0
    return share, "meta-kmeans"


def place_layer(usage: np.ndarray, slots_per_node: int, gpus_per_node: int) -> np.ndarray:
    """B's two-stage greedy for one layer, then the deal over each node's GPUs.

    usage [groups, experts] = U[d, e]. Returns the phy2log row [groups * slots_per_node].
    """
    groups, experts = usage.shape
    capacity = np.full(groups, experts // groups) + (np.arange(groups) < experts % groups)
    held: list[list[int]] = [[] for _ in range(groups)]
    placed = np.zeros(experts, dtype=bool)
    # Stage 1: (group, expert) pairs by U descending; each expert once, unique capacity;
    # among groups with equal U (a class split over groups), the one with most room.
    d_idx, e_idx = np.divmod(np.arange(groups * experts), experts)
    for flat in np.lexsort((d_idx, e_idx, -usage.ravel())).tolist():
        d, e = divmod(flat, experts)
        if placed[e]:
            continue
        room = [
            capacity[g] - len(held[g]) if usage[g, e] == usage[d, e] else 0 for g in range(groups)
        ]
        best = int(np.argmax(room))
        if room[best] > 0:
            held[best].append(e)
            placed[e] = True
    # Stage 2: fill each group's remaining slots with its most-used experts not yet held.
    total = usage.sum(axis=0)
    for d in range(groups):
        ranked = np.lexsort((np.arange(experts), -total, -usage[d])).tolist()
        while len(held[d]) < slots_per_node:  # more than one pass only if slots > experts
            have = set(held[d])
            extra = [e for e in ranked if e not in have][: slots_per_node - len(held[d])]
            held[d] += extra if extra else ranked[: slots_per_node - len(held[d])]
    # Inside a node: by U descending, dealt round-robin over the GPUs.
    row = []
    for d in range(groups):
        mine = sorted(held[d], key=lambda e: (-usage[d, e], e))
        row += [e for g in range(gpus_per_node) for e in mine[g::gpus_per_node]]
    return np.array(row, dtype=np.int64)


def solve(problem: PlacementProblem) -> PlacementResult:
    start = time.perf_counter()
    m, t = problem.profile.model, problem.topology
    demand = problem.demand  # [classes, layers, experts]
    share, rule = group_classes(demand, problem.weights, t.nodes, problem.seed)
    usage = np.einsum("cle,cd->dle", demand, share)  # U[d, layer, e]
    slots_per_node = problem.slots_per_gpu * t.gpus_per_node
    phy2log = np.stack(
        [
            place_layer(usage[:, layer], slots_per_node, t.gpus_per_node)
            for layer in range(m.num_moe_layers)
        ]
    )
    placement = Placement(phy2log, m.num_experts, t.num_gpus, t.gpus_per_node)
    on_node = placement.replicas_per_node() > 0  # [layers, experts, nodes]
    remote = float((usage * ~np.moveaxis(on_node, 2, 0)).sum())
    details: dict[str, Any] = {
        "objective_units": "expected remote (token, expert) hits under B's routing",
        "group_mapping": rule,
        "classes_per_node": [
            [name for c, name in enumerate(problem.class_names) if share[c, d] > 0]
            for d in range(t.nodes)
        ],
        "empty_groups": [d for d in range(t.nodes) if not share[:, d].any()],
    }
    return PlacementResult(
        method="paper-b",
        placement=placement,
        class_to_node_share=share,
        status="HEURISTIC",
        solve_seconds=time.perf_counter() - start,
        objective=remote,
        details=details,
    )
