"""The placement-benefit proxy used to choose activation clusters.

The placement solve does not exist yet, so clusters are judged by a stand-in for what
it would achieve. With ``N`` nodes, one node holds ``per_node = E / N`` experts of each
MoE layer. A request of cluster ``c`` runs on a node of its cluster; its
(token, layer, slot) activations that hit an expert on that node stay local.

* **hot-set locality** (optimistic): each cluster's node holds the cluster's
  ``per_node`` most used experts of every layer (from training counts). It ignores that
  every expert must live somewhere and that K clusters need K nodes' worth of memory, so
  it is an upper bound for a given clustering; used with ``K <= N``.
* **partition locality** (exact-once, ``K == N``): paper B's greedy stage 1 places every
  expert exactly once, each expert going to the node of its highest-use cluster that
  still has room, then the same share is measured.

Both are reported as the token-weighted fraction of held-out activations that stay
local. Uniform placement gives ``per_node / E``. Arrays: ``counts [n, layers, experts]``,
``cluster_counts [K, layers, experts]``, ``mask [K, layers, experts]`` bool.
"""

from __future__ import annotations

import numpy as np


def per_node_capacity(num_experts: int, nodes: int) -> int:
    """Experts of one layer that fit on one node, ``E / N`` (must divide exactly)."""
    if nodes < 1 or num_experts % nodes:
        raise ValueError(f"{num_experts} experts do not split evenly over {nodes} nodes")
    return num_experts // nodes


def top_mask(counts: np.ndarray, m: int) -> np.ndarray:
    """[..., experts] -> bool mask of the ``m`` largest entries of the last axis.

    Ties are broken by expert id (lower first), deterministically.
    """
    order = np.argsort(-counts, axis=-1, kind="stable")[..., :m]
    mask = np.zeros(counts.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return mask


def hot_set_mask(cluster_counts: np.ndarray, per_node: int) -> np.ndarray:
    """Each cluster's ``per_node`` most used experts per layer: [K, L, E] bool."""
    return top_mask(cluster_counts, per_node)


def partition_mask(cluster_counts: np.ndarray, per_node: int) -> np.ndarray:
    """Paper B's greedy stage 1: every expert placed exactly once, ``per_node`` per node.

    cluster_counts [K, L, E] with ``K * per_node == E``; per layer, (cluster, expert)
    pairs are taken in decreasing use and an expert goes to the first cluster in that
    order whose node still has room. Returns [K, L, E] bool (each expert in exactly one
    cluster per layer).
    """
    k, layers, experts = cluster_counts.shape
    if k * per_node != experts:
        raise ValueError(f"partition needs K * per_node == E, got {k} * {per_node} != {experts}")
    mask = np.zeros(cluster_counts.shape, dtype=bool)
    for layer in range(layers):
        use = cluster_counts[:, layer, :]
        order = np.argsort(-use, axis=None, kind="stable")
        room = np.full(k, per_node)
        placed = np.zeros(experts, dtype=bool)
        for flat in order:
            c, e = divmod(int(flat), experts)
            if not placed[e] and room[c]:
                mask[c, layer, e] = True
                placed[e] = True
                room[c] -= 1
    return mask


def local_activations(mask: np.ndarray, assign: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per request, the activations that hit its cluster's node: [n] float64."""
    return (counts * mask[assign]).sum(axis=(1, 2))


def locality(mask: np.ndarray, assign: np.ndarray, counts: np.ndarray) -> float:
    """Token-weighted fraction of ``counts`` that stays on the assigned clusters' nodes."""
    total = counts.sum()
    return float(local_activations(mask, assign, counts).sum() / total) if total else float("nan")


def oracle_locality(counts: np.ndarray, per_node: int) -> float:
    """Upper bound: every request on a node holding exactly its own top experts."""
    total = counts.sum()
    own = (counts * top_mask(counts, per_node)).sum()
    return float(own / total) if total else float("nan")
