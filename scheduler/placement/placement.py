"""The placement object: ``phy2log [moe_layers, slots]`` and the maps derived from it.

Slot ``p`` of a layer sits on GPU ``p // slots_per_gpu`` (equal slots per GPU, as SGLang
requires) and node ``gpu // gpus_per_node``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def placement_problems(phy2log: np.ndarray, num_experts: int, num_gpus: int) -> list[str]:
    """Everything that makes ``phy2log [layers, slots]`` unusable by SGLang, in words."""
    problems = []
    if phy2log.ndim != 2:
        return [f"physical_to_logical_map must be 2-D, got {phy2log.ndim}-D"]
    layers, slots = phy2log.shape
    if slots < num_experts:
        problems.append(f"width {slots} is below the number of experts {num_experts}")
    if slots % num_gpus:
        problems.append(
            f"width {slots} is not divisible by the EP size {num_gpus} (equal slots per GPU)"
        )
    if phy2log.size and (phy2log.min() < 0 or phy2log.max() >= num_experts):
        problems.append(f"logical ids must lie in [0, {num_experts})")
        return problems
    for layer in range(layers):
        missing = np.setdiff1d(np.arange(num_experts), phy2log[layer])
        if missing.size:
            problems.append(
                f"MoE layer index {layer}: expert(s) {missing[:5].tolist()}"
                f"{'...' if missing.size > 5 else ''} have no slot"
            )
            break
    return problems


@dataclass(frozen=True)
class Placement:
    """phy2log: [moe_layers, slots] int64, the logical expert held by every physical slot."""

    phy2log: np.ndarray
    num_experts: int
    num_gpus: int
    gpus_per_node: int

    def __post_init__(self) -> None:
        phy2log = np.array(self.phy2log, dtype=np.int64)  # a private, frozen copy
        problems = placement_problems(phy2log, self.num_experts, self.num_gpus)
        if problems:
            raise ValueError("; ".join(problems))
        phy2log.setflags(write=False)
        object.__setattr__(self, "phy2log", phy2log)

    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_slots(self) -> int:
        return int(self.phy2log.shape[1])

    @property
    def slots_per_gpu(self) -> int:
        return self.num_slots // self.num_gpus

    @property
    def num_nodes(self) -> int:
        return self.num_gpus // self.gpus_per_node

    def gpu_of_slot(self) -> np.ndarray:
        """[slots] GPU of every physical slot."""
        return np.arange(self.num_slots) // self.slots_per_gpu

    def replicas_per_gpu(self) -> np.ndarray:
        """[layers, experts, gpus] replica counts."""
        out = np.zeros((self.num_layers, self.num_experts, self.num_gpus), dtype=np.int64)
        layer_idx = np.repeat(np.arange(self.num_layers), self.num_slots)
        gpu_idx = np.tile(self.gpu_of_slot(), self.num_layers)
        np.add.at(out, (layer_idx, self.phy2log.ravel(), gpu_idx), 1)
        return out

    def replicas_per_node(self) -> np.ndarray:
        """[layers, experts, nodes] replica counts."""
        per_gpu = self.replicas_per_gpu()
        return per_gpu.reshape(*per_gpu.shape[:2], self.num_nodes, self.gpus_per_node).sum(-1)

    def node_presence(self) -> np.ndarray:
        """[layers * experts, nodes] float 1.0 where the node holds a replica of the expert
        (row ``l * experts + e``): a histogram's flat counts times this give per-node hits."""
        return (self.replicas_per_node() > 0).reshape(-1, self.num_nodes).astype(np.float64)

    def replica_counts(self) -> np.ndarray:
        """[layers, experts] replicas of every logical expert."""
        counts = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        for layer in range(self.num_layers):
            counts[layer] = np.bincount(self.phy2log[layer], minlength=self.num_experts)
        return counts

    def moves_from(self, other: Placement) -> int:
        """Expert weights to load onto GPUs to go from ``other`` to this placement.

        Per layer and GPU: replicas this placement needs that ``other`` does not already
        hold on that GPU (a multiset difference).
        """
        if other.phy2log.shape != self.phy2log.shape or other.num_gpus != self.num_gpus:
            raise ValueError("placements differ in shape; moves are undefined")
        new, old = self.replicas_per_gpu(), other.replicas_per_gpu()
        return int(np.maximum(new - old, 0).sum())

    @classmethod
    def trivial(
        cls, num_layers: int, num_experts: int, num_slots: int, num_gpus: int, gpus_per_node: int
    ) -> Placement:
        """SGLang's ``trivial`` layout: slot p holds expert p % num_experts."""
        row = np.arange(num_slots) % num_experts
        return cls(np.tile(row, (num_layers, 1)), num_experts, num_gpus, gpus_per_node)
