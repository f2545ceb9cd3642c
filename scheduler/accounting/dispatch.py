"""SGLang's static replica choice (``ep_dispatch_algorithm = static``) as one table.

For DP-attention rank ``r`` (GPU ``r``, node ``r // G``), MoE layer ``l`` and logical
expert ``e``, the replica a token on ``r`` reaches is (sglang-integration.md §1.3):

1. the replica on GPU ``r``, if there is one;
2. else a replica on node ``r // G``; when several GPUs of the node hold one, the first
   such GPU at or after ``r`` in the node, cyclically (GPU ``r+1``, ``r+2``, ..., wrapping
   to the node's first GPU), which spreads a node's ranks over its replicas;
3. else a fixed choice among all replicas (sorted by slot):
   ``replicas[(r * 2654435761 + l * 40503 + e) % n_replicas]``.

SGLang's own step 3 is a seeded fair random choice fixed per (rank, layer, expert); ours
is equal in distribution over ranks but not identical draw for draw, and its step 2
picks among the node's replicas the same way. Only the destination GPU matters to the
accounting, so when a GPU holds two replicas of one expert it does not say which.
"""

from __future__ import annotations

import numpy as np

from scheduler.placement.placement import Placement

#: Multipliers of the fixed off-node choice (Knuth's multiplicative hash, and a prime).
RANK_MULTIPLIER = 2654435761
LAYER_MULTIPLIER = 40503


def static_dispatch_table(placement: Placement) -> np.ndarray:
    """dest_gpu: [ranks, layers, experts] int32, the GPU a token on each rank reaches for
    each logical expert of each MoE layer (ranks = GPUs of the placement)."""
    layers, experts = placement.num_layers, placement.num_experts
    nodes, per_node = placement.num_nodes, placement.gpus_per_node
    has = placement.replicas_per_gpu().reshape(layers, experts, nodes, per_node) > 0

    # Steps 1 and 2: offset o = 0 is the rank's own GPU, o > 0 the node's next GPUs.
    # shifted[o, l, e, n, i] = has[l, e, n, (i + o) % G]
    shifted = np.stack([np.roll(has, -o, axis=3) for o in range(per_node)])
    on_node = shifted.any(axis=0)  # [layers, experts, nodes, G]
    first = shifted.argmax(axis=0)  # the smallest offset holding a replica
    local = (np.arange(per_node) + first) % per_node
    node_gpu = np.arange(nodes)[:, None] * per_node + local  # [layers, experts, nodes, G]
    node_gpu = node_gpu.reshape(layers, experts, -1).transpose(2, 0, 1)  # [ranks, l, e]
    on_node = on_node.reshape(layers, experts, -1).transpose(2, 0, 1)

    # Step 3: a fixed choice among the expert's replicas, listed in slot order.
    ranks = placement.num_gpus
    order = np.argsort(placement.phy2log, axis=1, kind="stable")  # slots grouped by expert
    counts = placement.replica_counts()  # [layers, experts]
    starts = np.cumsum(counts, axis=1) - counts
    r = np.arange(ranks, dtype=np.int64)[:, None, None]
    layer = np.arange(layers, dtype=np.int64)[None, :, None]
    expert = np.arange(experts, dtype=np.int64)[None, None, :]
    pick = (r * RANK_MULTIPLIER + layer * LAYER_MULTIPLIER + expert) % counts[None]
    slot = order.ravel()[layer * placement.num_slots + starts[None] + pick]
    fallback = slot // placement.slots_per_gpu

    return np.where(on_node, node_gpu, fallback).astype(np.int32)
