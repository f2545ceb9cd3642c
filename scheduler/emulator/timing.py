"""A small, replaceable cost model: how long an emulated request takes.

Pure. The project's real cost model (the simulator issue) will replace this one; it is
kept to a handful of documented constants so that expert locality shows up in latency.

Per MoE layer, a token sends one copy to every expert it uses that is not on its own
GPU: dispatch in FP8 (``hidden`` bytes + one FP32 scale per 128 channels) and combine in
BF16 (``2 * hidden`` bytes), over NVLink when the replica is on the same node and over
the NIC when it is on another (bandwidths per GPU per direction; prior-work.md §5).
A rank's decode step costs::

    step = step_fixed + moe_layers * layer_latency + sum over its running requests of
           sum over MoE layers of (same_node_hits * bytes / intra_bw
                                   + other_node_hits * bytes / inter_bw
                                   + top_k * expert_compute)

with the hits the request's expected per-token counts of experts reached on the same
node / another node. A request's per-token time is the step time of its rank's running
set at its admission (itself included); its prefill is one pass over its prompt tokens.
Not modelled: the all-to-all padding to the busiest rank, KV cache, chunked prefill,
batch changes after admission, overlap of communication with compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scheduler.emulator.expert_location import OTHER_NODE, SAME_NODE
from scheduler.model_shape import ModelShape


@dataclass(frozen=True)
class CostModel:
    """Constants of the cost model; bandwidths in GB/s per GPU per direction."""

    #: NVLink4 per GPU per direction, H100/H200 (prior-work.md §5.1; design.md default).
    intra_node_gbps: float = 450.0
    #: ConnectX-7 400 Gb/s per GPU (prior-work.md §5.1; design.md default).
    inter_node_gbps: float = 50.0
    #: Fixed cost of one decode step outside the MoE all-to-all: attention, dense layers,
    #: expert weight reads, sampling. An assumption, not calibrated.
    step_fixed_ms: float = 5.0
    #: Floor of one MoE layer's dispatch + combine kernels per step. An assumption.
    layer_latency_us: float = 20.0
    #: Expert compute per token per routed expert per layer. An assumption.
    expert_compute_us: float = 0.05
    #: Non-MoE prefill cost per prompt token (attention, dense layers). An assumption.
    prefill_token_us: float = 20.0

    def __post_init__(self) -> None:
        for name in ("intra_node_gbps", "inter_node_gbps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("step_fixed_ms", "layer_latency_us", "expert_compute_us", "prefill_token_us"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def copy_bytes(self, hidden_size: int) -> float:
        """Bytes one token sends to and gets back from one expert replica: FP8 dispatch
        with per-128-channel FP32 scales, BF16 combine (prior-work.md §5.3)."""
        return hidden_size * (1 + 4 / 128) + hidden_size * 2


@dataclass(frozen=True)
class Hits:
    """Expected experts reached per token, per MoE layer. same_node, other_node: [moe_layers]."""

    same_node: np.ndarray
    other_node: np.ndarray

    @property
    def other_node_per_token_layer(self) -> float:
        return float(self.other_node.mean())


def expected_hits(pi: np.ndarray, locality: np.ndarray) -> Hits:
    """Expected per-token hits from inclusion probabilities pi [moe_layers, experts] and a
    rank's dispatch locality [moe_layers, experts] (expert_location.dispatch_locality)."""
    return Hits(
        same_node=(pi * (locality == SAME_NODE)).sum(axis=1),
        other_node=(pi * (locality == OTHER_NODE)).sum(axis=1),
    )


def token_moe_us(cost: CostModel, model: ModelShape, hits: Hits) -> float:
    """One token's share of a step's MoE time (transfers + expert compute), in microseconds."""
    copy_kb = cost.copy_bytes(model.hidden_size) / 1e3  # kB / (GB/s) = us
    transfer = (
        hits.same_node.sum() * copy_kb / cost.intra_node_gbps
        + hits.other_node.sum() * copy_kb / cost.inter_node_gbps
    )
    compute = model.num_moe_layers * model.top_k * cost.expert_compute_us
    return float(transfer + compute)


def decode_step_s(cost: CostModel, model: ModelShape, batch_token_us: float) -> float:
    """Step time of a rank whose running requests' token_moe_us add up to batch_token_us."""
    fixed_us = cost.step_fixed_ms * 1e3 + model.num_moe_layers * cost.layer_latency_us
    return (fixed_us + batch_token_us) / 1e6


def prefill_s(cost: CostModel, model: ModelShape, prompt_tokens: int, hits: Hits) -> float:
    """One forward pass over ``prompt_tokens`` tokens with the given per-token hits."""
    per_token_us = token_moe_us(cost, model, hits) + cost.prefill_token_us
    return decode_step_s(cost, model, prompt_tokens * per_token_us)
