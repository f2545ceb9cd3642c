"""Modelled MoE-layer time: padded all-to-all time plus expert time (docs/cost-model.md).

The only cost model of the project: the simulator, the emulator and the server's
metrics all use it.

All-to-all (one dispatch and one combine phase per MoE layer)::

    phase_us = latency_us + max(inter_bytes / (efficiency * inter_node_gbps),
                                intra_bytes / (efficiency * intra_node_gbps))

where the bytes are those of the **busiest rank** (the kernels pad to it) and NIC and
NVLink run concurrently. ``latency_us`` and ``efficiency`` are fitted (least squares) on
DeepEP's published low-latency kernel times (EP 16 to 256, dispatch and combine);
:data:`DEEPEP_LOW_LATENCY` holds those points and :func:`deepep_low_latency_check`
reproduces them.

Expert time of one GPU in one step (a roofline: the slower of compute and weight reads)::

    expert_us = expert_fixed_us + max(pairs x 6 x hidden x width / (flops_eff x peak),
                                      distinct x 3 x hidden x width x bytes_per_weight
                                                 / (hbm_eff x hbm_gbps))

with ``pairs`` the (token, expert) pairs the GPU processes, ``distinct`` the distinct
experts it must read (three matrices each: gate, up, down), ``width`` the model's
``moe_intermediate_size``, the peak and HBM bandwidth from the topology's ``[gpu]``
and the weights FP8 or BF16. Padded to the busiest GPU of the layer (the next layer
waits for it). ``flops_efficiency`` and ``hbm_efficiency`` are fitted on DeepGEMM's
published FP8 GEMM times at DeepSeek-V3 expert shapes (:data:`DEEPGEMM_H800`,
:func:`deepgemm_check`).

Padding: :meth:`CostModel.padded_layer_time` is exact per layer (each layer's
all-to-all is padded to that layer's busiest rank and its experts to its busiest GPU;
needs an accounting made with ``per_layer=True``); :meth:`CostModel.mean_layer_time`
pads once over layer sums, a lower bound on the all-to-all part.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from scheduler.accounting.metrics import Accounting, BytesPerCopy, bytes_per_copy
from scheduler.model_shape import ModelShape
from scheduler.placement.topology import (
    DEFAULT_GPU,
    EXPERT_WEIGHTS,
    GPU_PRESETS,
    GpuSpec,
    Topology,
)

#: Fitted on DEEPEP_LOW_LATENCY with the NIC at 50 GB/s (see the module docstring).
LATENCY_US = 20.0
EFFICIENCY = 0.84
#: Fitted on DEEPGEMM_H800 (H800 peaks 1,979 FP8 TFLOPS, 3,350 GB/s): the share of the
#: dense FP8 peak and of the HBM bandwidth the expert GEMMs reach (docs/cost-model.md).
FLOPS_EFFICIENCY = 0.56
HBM_EFFICIENCY = 0.59
#: Routed experts' FFN width when the model shape does not give one (DeepSeek-V3's).
DEFAULT_EXPERT_WIDTH = 2048

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

#: DeepGEMM's README (deepseek-ai/DeepGEMM, H800, NVCC 12.8, FP8 x FP8 -> BF16): the
#: rows at DeepSeek-V3's expert shapes, N x K = 4096 x 7168 (gate and up fused) and
#: 7168 x 2048 (down). (groups, tokens per group, N, K, published TFLOPS): dense
#: GEMMs are one group; grouped rows are the contiguous (prefill) and masked (decode)
#: layouts.
DEEPGEMM_H800: tuple[tuple[int, int, int, int, float], ...] = (
    (1, 64, 4096, 7168, 287.0),
    (1, 64, 7168, 2048, 295.0),
    (1, 128, 4096, 7168, 533.0),
    (1, 128, 7168, 2048, 510.0),
    (1, 4096, 4096, 7168, 1304.0),
    (1, 4096, 7168, 2048, 1025.0),
    (4, 8192, 4096, 7168, 1297.0),
    (4, 8192, 7168, 2048, 1099.0),
    (8, 4096, 4096, 7168, 1288.0),
    (8, 4096, 7168, 2048, 1093.0),
    (1, 1024, 4096, 7168, 1233.0),
    (1, 1024, 7168, 2048, 925.0),
    (2, 512, 4096, 7168, 1040.0),
    (2, 512, 7168, 2048, 916.0),
    (4, 256, 4096, 7168, 932.0),
    (4, 256, 7168, 2048, 815.0),
)


@dataclass(frozen=True)
class LayerTime:
    """Modelled time of one MoE layer, microseconds. ``compute_us`` is the expert time
    of the busiest GPU (the slower of its FLOPs and its weight reads); ``flop_us`` and
    ``weight_read_us`` are the largest of each over the layer's GPUs (what would set
    the time if it were the only term). ``latency_us``: the fixed kernel latency inside
    dispatch + combine; the rest of them is bytes."""

    dispatch_us: float
    compute_us: float
    combine_us: float
    flop_us: float = 0.0
    weight_read_us: float = 0.0
    latency_us: float = 0.0

    @property
    def total_us(self) -> float:
        return self.dispatch_us + self.compute_us + self.combine_us

    @property
    def bytes_us(self) -> float:
        """Dispatch + combine time beyond the fixed latency: what the bytes cost."""
        return self.dispatch_us + self.combine_us - self.latency_us


@dataclass(frozen=True)
class CostModel:
    """Bandwidths in GB/s per GPU per direction, and the GPU (the Topology's, overridable)."""

    intra_node_gbps: float = 450.0
    inter_node_gbps: float = 50.0
    efficiency: float = EFFICIENCY
    latency_us: float = LATENCY_US
    gpu: GpuSpec = field(default_factory=lambda: GPU_PRESETS[DEFAULT_GPU])
    expert_weights: str = "fp8"
    flops_efficiency: float = FLOPS_EFFICIENCY
    hbm_efficiency: float = HBM_EFFICIENCY
    expert_fixed_us: float = 0.0

    def __post_init__(self) -> None:
        for key in ("intra_node_gbps", "inter_node_gbps"):
            if not getattr(self, key) > 0:
                raise ValueError(f"CostModel.{key} must be > 0, got {getattr(self, key)}")
        for key in ("efficiency", "flops_efficiency", "hbm_efficiency"):
            if not 0 < getattr(self, key) <= 1:
                raise ValueError(f"CostModel.{key} must be in (0, 1], got {getattr(self, key)}")
        if self.latency_us < 0 or self.expert_fixed_us < 0:
            raise ValueError("CostModel latencies must be >= 0")
        if self.expert_weights not in EXPERT_WEIGHTS:
            raise ValueError(f"CostModel.expert_weights must be one of {list(EXPERT_WEIGHTS)}")

    @classmethod
    def from_topology(cls, topology: Topology, **overrides: Any) -> CostModel:
        """Bandwidths and GPU from ``topology``; any field can be overridden by keyword."""
        base = cls(
            intra_node_gbps=topology.intra_node_gbps,
            inter_node_gbps=topology.inter_node_gbps,
            gpu=topology.gpu,
            expert_weights=topology.expert_weights,
        )
        return replace(base, **overrides)

    def all_to_all_us(self, inter_bytes: float, intra_bytes: float = 0.0) -> float:
        """One padded all-to-all phase for the busiest rank's NIC and NVLink bytes."""
        # bytes / (GB/s) = ns; / 1e3 = us
        inter = inter_bytes / (self.efficiency * self.inter_node_gbps) / 1e3
        intra = intra_bytes / (self.efficiency * self.intra_node_gbps) / 1e3
        return self.latency_us + max(inter, intra)

    # ------------------------------------------------------------------ experts

    @staticmethod
    def expert_width(model: ModelShape) -> int:
        return model.moe_intermediate_size or DEFAULT_EXPERT_WIDTH

    def expert_bytes(self, model: ModelShape) -> float:
        """Weight bytes of one routed expert: gate, up and down, hidden x width each."""
        return (
            3.0 * model.hidden_size * self.expert_width(model) * EXPERT_WEIGHTS[self.expert_weights]
        )

    def flop_us(self, pairs: np.ndarray | float, model: ModelShape) -> np.ndarray:
        """Expert GEMM time of ``pairs`` (token, expert) pairs: 6 x hidden x width FLOPs
        each (three GEMMs, 2 FLOPs per multiply-add)."""
        flops = np.asarray(pairs, dtype=np.float64) * 6.0 * model.hidden_size
        rate = self.flops_efficiency * self.gpu.tflops(self.expert_weights) * 1e6  # FLOP/us
        return flops * self.expert_width(model) / rate

    def weight_read_us(self, distinct: np.ndarray | float, model: ModelShape) -> np.ndarray:
        """Time to read ``distinct`` experts' weights from HBM."""
        rate = self.hbm_efficiency * self.gpu.hbm_gbps * 1e3  # bytes/us
        return np.asarray(distinct, dtype=np.float64) * self.expert_bytes(model) / rate

    def expert_us(
        self, pairs: np.ndarray | float, distinct: np.ndarray | float, model: ModelShape
    ) -> np.ndarray:
        """Expert time of a GPU: the slower of FLOPs and weight reads, plus the fixed part
        (arrays element-wise; plain numbers in plain Python, for the emulator's per-request
        timing)."""
        if isinstance(pairs, int | float) and isinstance(distinct, int | float):
            width, hidden = self.expert_width(model), model.hidden_size
            flop = (
                pairs
                * 6.0
                * hidden
                * width
                / (self.flops_efficiency * self.gpu.tflops(self.expert_weights) * 1e6)
            )
            reads = (
                distinct
                * self.expert_bytes(model)
                / (self.hbm_efficiency * self.gpu.hbm_gbps * 1e3)
            )
            return self.expert_fixed_us + max(flop, reads)  # type: ignore[return-value]
        return self.expert_fixed_us + np.maximum(
            self.flop_us(pairs, model), self.weight_read_us(distinct, model)
        )

    # ------------------------------------------------------------------ layers

    def layer_time(
        self,
        max_rank_inter_copies: float,
        max_rank_intra_copies: float,
        max_gpu_token_experts: float,
        size: BytesPerCopy,
        model: ModelShape,
        max_gpu_distinct_experts: float | None = None,
    ) -> LayerTime:
        """One MoE layer from its busiest rank's copies (destinations x tokens) and its
        busiest GPU's (token, expert) pairs and distinct experts."""
        distinct = max_gpu_distinct_experts
        if distinct is None:
            distinct = min(max_gpu_token_experts, model.num_experts)
        return LayerTime(
            dispatch_us=self.all_to_all_us(
                max_rank_inter_copies * size.dispatch, max_rank_intra_copies * size.dispatch
            ),
            compute_us=float(self.expert_us(max_gpu_token_experts, distinct, model)),
            combine_us=self.all_to_all_us(
                max_rank_inter_copies * size.combine, max_rank_intra_copies * size.combine
            ),
            flop_us=float(self.flop_us(max_gpu_token_experts, model)),
            weight_read_us=float(self.weight_read_us(distinct, model)),
            latency_us=2 * self.latency_us,
        )

    def padded_layer_time(self, accounting: Accounting, model: ModelShape) -> LayerTime:
        """Exact per-layer padding, averaged over the MoE layers: layer ``l``'s dispatch and
        combine are padded to the rank with the most copies *in layer l* (NIC and NVLink
        separately, the slower counts), its experts to the GPU of layer ``l`` with the
        largest expert time.

        Needs ``accounting.rank_layer_node_copies`` (``account(..., per_layer=True)``).
        Its all-to-all part is always >= that of :meth:`mean_layer_time` of the same
        accounting (max of sums <= sum of maxes).
        """
        inter = accounting.rank_layer_node_copies
        intra = accounting.rank_layer_intra_node_copies
        if inter is None or intra is None:
            raise ValueError("padded_layer_time needs an accounting with per_layer=True")
        size = accounting.bytes_per_copy
        max_inter = inter.max(axis=0).astype(np.float64)  # [layers]
        max_intra = intra.max(axis=0).astype(np.float64)
        load, distinct = accounting.gpu_load, accounting.gpu_distinct_experts
        if not load.size:
            load = distinct = np.zeros((max(model.num_moe_layers, 1), 1))
        expert = self.expert_us(load, distinct, model)  # [layers, gpus]
        return LayerTime(
            dispatch_us=float(self._phase_us(max_inter, max_intra, size.dispatch).mean()),
            compute_us=float(expert.max(axis=1).mean()),
            combine_us=float(self._phase_us(max_inter, max_intra, size.combine).mean()),
            flop_us=float(self.flop_us(load.max(axis=1), model).mean()),
            weight_read_us=float(self.weight_read_us(distinct.max(axis=1), model).mean()),
            latency_us=2 * self.latency_us,
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
        padding is taken over layer sums, a lower bound on per-layer padding), experts
        from each layer's busiest GPU, averaged over layers."""
        layers = max(model.num_moe_layers, 1)
        load, distinct = accounting.gpu_load, accounting.gpu_distinct_experts
        if not load.size:
            load = distinct = np.zeros((layers, 1))
        expert = self.expert_us(load, distinct, model)
        time = self.layer_time(
            float(accounting.rank_node_copies.max(initial=0)) / layers,
            float(accounting.rank_intra_node_copies.max(initial=0)) / layers,
            float(load.max(axis=1).mean()),
            accounting.bytes_per_copy,
            model,
            float(distinct.max(axis=1).mean()),
        )
        return replace(time, compute_us=float(expert.max(axis=1).mean()))


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


def deepgemm_check(model: CostModel | None = None) -> list[dict[str, Any]]:
    """Modelled vs published DeepGEMM times (:data:`DEEPGEMM_H800`) on an H800: each row
    is ``groups`` experts of ``N x K`` FP8 weights with ``tokens`` tokens each (one of
    the three expert matrices per row, so 2 x tokens x N x K FLOPs per group)."""
    model = model or CostModel(gpu=GPU_PRESETS["H800"])
    rows = []
    for groups, tokens, n, k, tflops in DEEPGEMM_H800:
        flops = 2.0 * groups * tokens * n * k
        published = flops / (tflops * 1e6)  # us
        flop = flops / (model.flops_efficiency * model.gpu.fp8_tflops * 1e6)
        reads = (
            groups
            * n
            * k
            * EXPERT_WEIGHTS["fp8"]
            / (model.hbm_efficiency * model.gpu.hbm_gbps * 1e3)
        )
        rows.append(
            {
                "groups": groups,
                "tokens": tokens,
                "n": n,
                "k": k,
                "published_us": published,
                "modelled_us": max(flop, reads),
                "bound": "weights" if reads > flop else "flops",
            }
        )
    return rows
