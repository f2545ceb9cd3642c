"""Replica helpers shared by the peers that add redundancy EPLB's way (paper A, MoETuner).

Pure: arrays in, arrays out.
"""

from __future__ import annotations

import numpy as np

from scheduler.placement.methods.eplb import replicate_experts


def replica_counts(weight: np.ndarray, num_slots: int) -> np.ndarray:
    """weight [layers, experts] -> [layers, experts] replicas by EPLB's rule (each extra
    slot to the expert with the largest load per replica)."""
    return replicate_experts(weight.astype(np.float32), num_slots)[2]


def copy_caps(counts: np.ndarray, num_gpus: int) -> np.ndarray:
    """Most copies of an expert one GPU may hold: ceil(count / gpus) (1 unless an expert
    has more replicas than there are GPUs). Same shape as ``counts``."""
    return -(-counts // num_gpus)


def lpt_pack(
    items: np.ndarray, load: np.ndarray, cap: np.ndarray, bins: int, size: int
) -> list[list[int]] | None:
    """Heaviest item first into the lightest bin with room that holds fewer than
    ``cap[e]`` copies of its expert; None if that greedy gets stuck.

    items [n] expert ids (n = bins * size); load [experts] per-replica load; cap [experts].
    """
    held: list[list[int]] = [[] for _ in range(bins)]
    weight = [0.0] * bins
    for e in items[np.argsort(-load[items], kind="stable")].tolist():
        open_bins = [b for b in range(bins) if len(held[b]) < size and held[b].count(e) < cap[e]]
        if not open_bins:
            return None
        b = min(open_bins, key=weight.__getitem__)
        held[b].append(e)
        weight[b] += float(load[e])
    return held


def deal(items: np.ndarray, bins: int) -> list[list[int]]:
    """Items sorted by expert and dealt to the bins in turn: equal sizes, and an expert's
    copies on distinct bins (up to ceil(copies / bins) per bin). Always feasible."""
    ordered = np.sort(items).tolist()
    return [ordered[b::bins] for b in range(bins)]


def pack(
    items: np.ndarray, load: np.ndarray, cap: np.ndarray, bins: int, size: int
) -> list[list[int]]:
    """:func:`lpt_pack`, or :func:`deal` when the greedy gets stuck."""
    return lpt_pack(items, load, cap, bins, size) or deal(items, bins)
