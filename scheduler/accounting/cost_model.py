"""Modelled MoE-layer time: padded all-to-all time plus expert compute (docs/cost-model.md).

All-to-all (one dispatch and one combine phase per MoE layer)::

    phase_us = latency_us + max(inter_bytes / (efficiency * inter_node_gbps),
                                intra_bytes / (efficiency * intra_node_gbps))

where the bytes are those of the **busiest rank** (the kernels pad to it) and NIC and
NVLink run concurrently. ``latency_us`` and ``efficiency`` are fitted (least squares) on
DeepEP's published low-latency kernel times (prior-work.md §5.2, current values, EP 16 to
256, dispatch and combine); :data:`DEEPEP_LOW_LATENCY` holds those points and
:func:`deepep_low_latency_check` reproduces them. Expert compute is a plain FLOP model:
``max_gpu_token_experts * 6 * hidden * intermediate / expert_tflops`` (three GEMMs, 2 FLOPs
per multiply-add) plus a fixed ``expert_fixed_us``; it is not calibrated on published
numbers.

Padding: :meth:`CostModel.padded_layer_time` is exact per layer (each layer's
all-to-all is padded to that layer's busiest rank; needs an accounting made with
``per_layer=True``); :meth:`CostModel.mean_layer_time` pads once over layer sums, a lower
bound on it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from scheduler.accounting.metrics import Accounting, BytesPerCopy, bytes_per_copy
from scheduler.model_shape import ModelShape
from scheduler.placement.topology import Topology

#: Fitted on DEEPEP_LOW_LATENCY with the NIC at 50 GB/s (see the module docstring).
LATENCY_US = 20.0
EFFICIENCY = 0.84

#: DeepEP V1 low-latency kernels, H800 + CX7 400G (50 GB/s), 128 tokens per rank,
#: hidden 7168, top-8 of 256 experts, FP8 dispatch, BF16 combine; 8 GPUs per node.
#: (EP size, dispatch us, combine us), current README values.
DEEPEP_LOW_LATENCY: tuple[tuple[int, float, float], ...] = (
    (16, 118.0, 195.0),
    (32, 155.0, 273.0),
    (64, 173.0, 314.0),
    (128, 192.0, 369.0),
    (256, 194.0, 360.0),
)
DEEPEP_HIDDEN = 7168
DEEPEP_TOP_K = 8
DEEPEP_LL_TOKENS = 128


@dataclass(frozen=True)
class LayerTime:
    """Modelled time of one MoE layer, microseconds."""

    dispatch_us: float
    compute_us: float
    combine_us: float

    @property
    def total_us(self) -> float:
        return self.dispatch_us + self.compute_us + self.combine_us


@dataclass(frozen=True)
class CostModel:
    """Bandwidths in GB/s per GPU per direction (the Topology's, overridable)."""

    intra_node_gbps: float = 450.0
    inter_node_gbps: float = 50.0
    efficiency: float = EFFICIENCY
    latency_us: float = LATENCY_US
    expert_tflops: float = 400.0
    expert_intermediate: int = 2048
    expert_fixed_us: float = 0.0

    def __post_init__(self) -> None:
        for key in ("intra_node_gbps", "inter_node_gbps", "expert_tflops"):
            if not getattr(self, key) > 0:
                raise ValueError(f"CostModel.{key} must be > 0, got {getattr(self, key)}")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"CostModel.efficiency must be in (0, 1], got {self.efficiency}")
        if self.latency_us < 0 or self.expert_fixed_us < 0 or self.expert_intermediate < 1:
            raise ValueError("CostModel latencies must be >= 0 and expert_intermediate >= 1")

    @classmethod
    def from_topology(cls, topology: Topology, **overrides: Any) -> CostModel:
        """Bandwidths from ``topology``; any field can be overridden by keyword."""
        base = cls(
            intra_node_gbps=topology.intra_node_gbps, inter_node_gbps=topology.inter_node_gbps
        )
        return replace(base, **overrides)

    def all_to_all_us(self, inter_bytes: float, intra_bytes: float = 0.0) -> float:
        """One padded all-to-all phase for the busiest rank's NIC and NVLink bytes."""
        # bytes / (GB/s) = ns; / 1e3 = us
        inter = inter_bytes / (self.efficiency * self.inter_node_gbps) / 1e3
        intra = intra_bytes / (self.efficiency * self.intra_node_gbps) / 1e3
        return self.latency_us + max(inter, intra)

    def compute_us(self, max_gpu_token_experts: float, hidden_size: int) -> float:
        """Expert GEMMs of the busiest GPU: (token, expert) pairs x 6 x hidden x intermediate."""
        flops = max_gpu_token_experts * 6.0 * hidden_size * self.expert_intermediate
        return self.expert_fixed_us + flops / (self.expert_tflops * 1e6)

    def layer_time(
        self,
        max_rank_inter_copies: float,
        max_rank_intra_copies: float,
        max_gpu_token_experts: float,
        size: BytesPerCopy,
        hidden_size: int,
    ) -> LayerTime:
        """One MoE layer from its busiest rank's copies (destinations x tokens) and its
        busiest GPU's (token, expert) pairs."""
        return LayerTime(
            dispatch_us=self.all_to_all_us(
                max_rank_inter_copies * size.dispatch, max_rank_intra_copies * size.dispatch
            ),
            compute_us=self.compute_us(max_gpu_token_experts, hidden_size),
            combine_us=self.all_to_all_us(
                max_rank_inter_copies * size.combine, max_rank_intra_copies * size.combine
            ),
        )

    def padded_layer_time(self, accounting: Accounting, model: ModelShape) -> LayerTime:
        """Exact per-layer padding, averaged over the MoE layers: layer ``l``'s dispatch and
        combine are padded to the rank with the most copies *in layer l* (NIC and NVLink
        separately, the slower counts), its compute to the busiest GPU of layer ``l``.

        Needs ``accounting.rank_layer_node_copies`` (``account(..., per_layer=True)``).
        Always >= :meth:`mean_layer_time` of the same accounting (max of sums <= sum of
        maxes).
        """
        inter = accounting.rank_layer_node_copies
        intra = accounting.rank_layer_intra_node_copies
        if inter is None or intra is None:
            raise ValueError("padded_layer_time needs an accounting with per_layer=True")
        size = accounting.bytes_per_copy
        max_inter = inter.max(axis=0).astype(np.float64)  # [layers]
        max_intra = intra.max(axis=0).astype(np.float64)
        load = accounting.gpu_load
        max_gpu = load.max(axis=1).astype(np.float64) if load.size else np.zeros(1)
        return LayerTime(
            dispatch_us=float(self._phase_us(max_inter, max_intra, size.dispatch).mean()),
            compute_us=float(self.compute_us(float(max_gpu.mean()), model.hidden_size)),
            combine_us=float(self._phase_us(max_inter, max_intra, size.combine).mean()),
        )

    def _phase_us(
        self, inter_copies: np.ndarray, intra_copies: np.ndarray, nbytes: int
    ) -> np.ndarray:
        """:meth:`all_to_all_us` over arrays of copies (bytes = copies x ``nbytes``)."""
        inter = inter_copies * nbytes / (self.efficiency * self.inter_node_gbps) / 1e3
        intra = intra_copies * nbytes / (self.efficiency * self.intra_node_gbps) / 1e3
        return self.latency_us + np.maximum(inter, intra)

    def mean_layer_time(self, accounting: Accounting, model: ModelShape) -> LayerTime:
        """The accounted tokens as one step: per-rank copies averaged over the layers (so
        padding is taken over layer sums, a lower bound on per-layer padding), compute
        from each layer's busiest GPU, averaged over layers."""
        layers = max(model.num_moe_layers, 1)
        max_gpu = float(accounting.gpu_load.max(axis=1).mean()) if accounting.gpu_load.size else 0
        return self.layer_time(
            float(accounting.rank_node_copies.max(initial=0)) / layers,
            float(accounting.rank_intra_node_copies.max(initial=0)) / layers,
            max_gpu,
            accounting.bytes_per_copy,
            model.hidden_size,
        )


def deepep_low_latency_check(model: CostModel | None = None) -> list[dict[str, float]]:
    """Modelled vs published DeepEP low-latency times (:data:`DEEPEP_LOW_LATENCY`).

    The benchmark routes top-8 uniformly over 256 experts spread evenly over ``EP`` GPUs,
    8 per node; low-latency kernels send one copy per expert, so a fraction
    ``1 - 8 / EP`` of a rank's ``128 x 8`` copies crosses nodes (the rest uses NVLink).
    """
    model = model or CostModel()
    size = bytes_per_copy(DEEPEP_HIDDEN)
    rows = []
    for ep, dispatch_us, combine_us in DEEPEP_LOW_LATENCY:
        copies = DEEPEP_LL_TOKENS * DEEPEP_TOP_K
        remote = copies * (1 - 8 / ep)
        local = copies - remote
        modelled_d = model.all_to_all_us(remote * size.dispatch, local * size.dispatch)
        modelled_c = model.all_to_all_us(remote * size.combine, local * size.combine)
        rows.append(
            {
                "ep": ep,
                "dispatch_us": dispatch_us,
                "dispatch_modelled_us": modelled_d,
                "combine_us": combine_us,
                "combine_modelled_us": modelled_c,
            }
        )
    return rows


def relative_errors(rows: list[dict[str, float]]) -> np.ndarray:
    """[points, 2] (modelled - published) / published, dispatch and combine."""
    return np.array(
        [
            [
                (r["dispatch_modelled_us"] - r["dispatch_us"]) / r["dispatch_us"],
                (r["combine_modelled_us"] - r["combine_us"]) / r["combine_us"],
            ]
            for r in rows
        ]
    )
