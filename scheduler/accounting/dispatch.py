"""SGLang's static replica choice (``ep_dispatch_algorithm = static``) as one table.

The only model of SGLang's dispatch in the project: the accounting, the simulator, the
emulator and the server all read :func:`static_dispatch_table`.

For DP-attention rank ``r`` (GPU ``r``, node ``r // G``), MoE layer ``l`` and logical
expert ``e`` with replicas in slot order, SGLang 0.5.23
(``python/sglang/srt/eplb/expert_location.py``, ``_find_nearest_expert`` and
``compute_logical_to_rank_dispatch_physical_map``) picks, in this order:

1. the only replica, when there is one;
2. the lowest-slot replica on GPU ``r``, if GPU ``r`` holds one;
3. the lowest-slot replica on node ``r // G``, if the node holds some **but not all**
   replicas (the node filter must narrow the choice);
4. otherwise (no replica on the node, or every replica on it) a seeded fair random
   choice, fixed per (rank, layer, expert): the ranks left for this step are dealt the
   replicas as evenly as possible (each replica gets ``floor`` or ``ceil`` of
   ranks / replicas), in a random order.

Steps 1-3 are deterministic and reproduced exactly. Step 4 is reproduced in
distribution: the same fair dealing, drawn from numpy's generator seeded with
:data:`SEED` (SGLang draws from Python's ``random.Random(42)`` in a per-rank order, so
the two do not agree draw for draw). Only the destination GPU matters to the
accounting.
"""

from __future__ import annotations

import numpy as np

from scheduler.placement.placement import Placement

#: Seed of the fair random choice of step 4 (SGLang seeds its own with 42).
SEED = 42


def static_dispatch_table(placement: Placement) -> np.ndarray:
    """dest_gpu: [ranks, layers, experts] int32, the GPU a token on each rank reaches for
    each logical expert of each MoE layer (ranks = GPUs of the placement)."""
    layers, experts = placement.num_layers, placement.num_experts
    nodes, per_node, ranks = placement.num_nodes, placement.gpus_per_node, placement.num_gpus
    per_gpu = placement.replicas_per_gpu()  # [layers, experts, gpus]
    counts = placement.replica_counts()  # [layers, experts]
    has = per_gpu > 0
    on_node = has.reshape(layers, experts, nodes, per_node)
    node_count = per_gpu.reshape(layers, experts, nodes, per_node).sum(axis=3)

    # Step 3: the node's lowest slot is on the node's first GPU holding a replica (slots
    # are numbered GPU by GPU); it applies when the node holds some but not all replicas.
    first_gpu = np.arange(nodes) * per_node + on_node.argmax(axis=3)  # [layers, experts, nodes]
    narrows = (node_count > 0) & (node_count < counts[:, :, None])
    node_of_rank = np.arange(ranks) // per_node
    dest = first_gpu[:, :, node_of_rank]  # [layers, experts, ranks]
    decided = narrows[:, :, node_of_rank]
    # Step 2 overrides step 3; step 1 is step 2 or 4 with a single replica.
    dest = np.where(has, np.arange(ranks), dest)  # has[l, e, r]: GPU r holds a replica
    decided |= has

    # Step 4: deal the replicas (in slot order) to the undecided ranks, in a random order.
    order = np.argsort(placement.phy2log, axis=1, kind="stable")  # slots grouped by expert
    starts = np.cumsum(counts, axis=1) - counts
    keys = np.random.default_rng(SEED).random((layers, experts, ranks))
    keys[decided] = np.inf  # decided ranks sort last and take no part in the dealing
    position = np.argsort(np.argsort(keys, axis=2, kind="stable"), axis=2, kind="stable")
    pick = position % counts[:, :, None]
    layer = np.arange(layers)[:, None, None]
    slot = order[layer, starts[:, :, None] + pick]
    dest = np.where(decided, dest, slot // placement.slots_per_gpu)
    return np.ascontiguousarray(dest.transpose(2, 0, 1)).astype(np.int32)
