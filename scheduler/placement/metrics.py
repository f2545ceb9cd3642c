"""Predicted metrics of a placement on a profile (expected values; docs/placement.md).

The token source is the node a class's requests are served on (``class_to_node_share``),
with each node's demand spread evenly over its ranks. Replica choice follows SGLang's
static dispatch in expectation: a replica on the rank's own GPU, else the node's
lowest-slot replica when the node holds some but not all replicas, else the fixed
per-rank choice among all replicas, which over ranks is an even spread.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scheduler.model_shape import ModelShape
from scheduler.placement.placement import Placement
from scheduler.placement.topology import Topology


def node_demand(demand: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """demand [classes, layers, experts] x shares [classes, nodes] -> [nodes, layers, experts]."""
    return np.einsum("cle,cn->nle", demand, shares)


def remote_cost(
    node_dem: np.ndarray, placement: Placement, link_cost: np.ndarray
) -> tuple[float, float]:
    """(remote (token, expert) hits, the same weighted by link cost) under ``node_dem``."""
    per_node = placement.replicas_per_node()  # [layers, experts, nodes]
    local = np.moveaxis(per_node > 0, 2, 0)  # [nodes, layers, experts]
    remote = node_dem * ~local
    # Expected link cost of a remote hit: mean over the expert's replicas of cost[src, dst].
    reps = per_node.astype(np.float64)  # [layers, experts, nodes]
    mean_cost = np.einsum("len,sn->sle", reps, link_cost) / reps.sum(axis=2)[None]
    return float(remote.sum()), float((remote * mean_cost).sum())


def gpu_loads(node_dem: np.ndarray, placement: Placement) -> np.ndarray:
    """[layers, gpus] expected tokens processed per GPU (static dispatch, see module doc).

    A rank without its own replica sends to its node's lowest-slot replica when the node
    holds some but not all replicas, else (none on the node, or all) to one dealt at
    random: in expectation an even spread over the replicas."""
    nodes, layers, experts = node_dem.shape
    g_per_node = placement.gpus_per_node
    rep = placement.replicas_per_gpu().astype(np.float64)  # [layers, experts, gpus]
    loads = np.zeros((layers, placement.num_gpus))
    for layer in range(layers):
        r = rep[layer]  # [experts, gpus]
        has = r > 0
        total = r.sum(axis=1)  # [experts]
        for n in range(nodes):
            gpus = slice(n * g_per_node, (n + 1) * g_per_node)
            per_rank = node_dem[n, layer] / g_per_node  # [experts]
            own = has[:, gpus].sum(axis=1)  # ranks of node n holding e
            loads[layer, gpus] += (has[:, gpus] * per_rank[:, None]).sum(axis=0)
            rest = per_rank * (g_per_node - own)  # demand of ranks without their own replica
            node_reps = r[:, gpus].sum(axis=1)
            narrow = (node_reps > 0) & (node_reps < total)
            first = n * g_per_node + has[:, gpus].argmax(axis=1)
            np.add.at(loads[layer], first[narrow], rest[narrow])
            spread = ~narrow
            loads[layer] += (rest[spread, None] * r[spread] / total[spread, None]).sum(axis=0)
    return loads


def imbalance(loads: np.ndarray) -> np.ndarray:
    """max / mean along the last axis (1.0 = perfectly balanced; nan when empty)."""
    mean = loads.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, loads.max(axis=-1) / np.where(mean > 0, mean, 1), np.nan)


def predicted_metrics(
    demand: np.ndarray,
    weights: np.ndarray,
    model: ModelShape,
    placement: Placement,
    shares: np.ndarray,
    topology: Topology,
) -> dict[str, Any]:
    """The plan's predicted metrics; see the module docstring for the dispatch model.

    Token counts are the profile's; ``busiest_rank_inter_node_bytes`` is the largest
    expected inter-node volume one rank sends (and receives back) over those tokens,
    counting one copy per remote expert as per-expert low-latency kernels do."""
    nd = node_demand(demand, shares)
    remote, weighted = remote_cost(nd, placement, topology.link_cost)
    local = np.moveaxis(placement.replicas_per_node() > 0, 2, 0)  # [nodes, layers, experts]
    per_rank_remote = (nd * ~local).sum(axis=(1, 2)) / placement.gpus_per_node  # [nodes]
    token_layers = demand.sum() / model.top_k
    gpu_imb = imbalance(gpu_loads(nd, placement))
    request_load = weights @ shares
    return {
        "remote_hits_per_token_layer": remote / token_layers if token_layers else 0.0,
        "weighted_remote_hits_per_token_layer": weighted / token_layers if token_layers else 0.0,
        "local_fraction": 1 - remote / demand.sum() if demand.sum() else 1.0,
        "gpu_expert_load_imbalance_mean": float(np.nanmean(gpu_imb)),
        "gpu_expert_load_imbalance_worst": float(np.nanmax(gpu_imb)),
        "balancedness_mean": float(np.nanmean(1 / gpu_imb)),
        "node_request_load_imbalance": float(imbalance(request_load)),
        # per remote (token, expert) hit: FP8 dispatch (1 B) + BF16 combine (2 B) per element
        "busiest_rank_inter_node_bytes": float(per_rank_remote.max() * model.hidden_size * 3),
    }
