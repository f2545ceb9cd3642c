"""Cluster topology: nodes x GPUs, bandwidths, and the link cost between nodes."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from scheduler.errors import ConfigError, InputError

#: What the expert weights are stored in: bytes per weight, and which peak rate applies.
EXPERT_WEIGHTS = {"fp8": 1, "bf16": 2}


@dataclass(frozen=True)
class GpuSpec:
    """Spec-sheet figures of one GPU: HBM bandwidth (GB/s) and dense tensor-core peaks
    (TFLOPS, without sparsity). Efficiencies are applied by the cost model."""

    name: str
    hbm_gbps: float
    bf16_tflops: float
    fp8_tflops: float

    def __post_init__(self) -> None:
        for key in ("hbm_gbps", "bf16_tflops", "fp8_tflops"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"[gpu] {key} must be > 0, got {getattr(self, key)}")

    def tflops(self, weights: str) -> float:
        return self.fp8_tflops if weights == "fp8" else self.bf16_tflops


#: NVIDIA spec sheets (dense peaks, SXM parts): H100 SXM 3.35 TB/s, 989 BF16 / 1,979 FP8
#: TFLOPS; H800 SXM as H100 (DeepGEMM's and DeepEP's test GPU); H200 SXM 4.8 TB/s, same
#: compute as H100; H20 4.0 TB/s, 148 BF16 / 296 FP8; B200 8 TB/s, 2,250 BF16 / 4,500 FP8
#: (docs/cost-model.md lists the sources).
GPU_PRESETS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        GpuSpec("H100", 3350.0, 989.0, 1979.0),
        GpuSpec("H800", 3350.0, 989.0, 1979.0),
        GpuSpec("H200", 4800.0, 989.0, 1979.0),
        GpuSpec("H20", 4000.0, 148.0, 296.0),
        GpuSpec("B200", 8000.0, 2250.0, 4500.0),
    )
}
DEFAULT_GPU = "H100"


@dataclass(frozen=True)
class Topology:
    """``nodes`` x ``gpus_per_node`` GPUs; DP-attention rank r sits on GPU r, node r // G.

    Bandwidths are GB/s per GPU per direction. ``link_cost [nodes, nodes]`` weighs a
    token sent from node a to node b (0 on the diagonal; 1 elsewhere by default, i.e. every
    remote hit costs the same on a uniform fabric). ``gpu``: the GPU's HBM bandwidth and
    peaks (``[gpu]``, default H100 SXM); ``expert_weights``: ``fp8`` or ``bf16``.
    """

    nodes: int
    gpus_per_node: int
    intra_node_gbps: float = 450.0
    inter_node_gbps: float = 50.0
    link_cost: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    gpu: GpuSpec = field(default_factory=lambda: GPU_PRESETS[DEFAULT_GPU])
    expert_weights: str = "fp8"

    def __post_init__(self) -> None:
        if self.expert_weights not in EXPERT_WEIGHTS:
            raise ConfigError(
                f"[gpu] expert_weights must be one of {', '.join(EXPERT_WEIGHTS)}, "
                f"got {self.expert_weights!r}"
            )
        if self.nodes < 1:
            raise ConfigError(f"[cluster] nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 1:
            raise ConfigError(f"[cluster] gpus_per_node must be >= 1, got {self.gpus_per_node}")
        for key in ("intra_node_gbps", "inter_node_gbps"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"[bandwidth] {key.removesuffix('_gbps')} must be > 0")
        cost = np.asarray(self.link_cost, dtype=np.float64)
        if cost.size == 0:
            cost = 1.0 - np.eye(self.nodes)
        if cost.shape != (self.nodes, self.nodes):
            raise ConfigError(
                f"[links] cost must be a {self.nodes}x{self.nodes} matrix, got {cost.shape}"
            )
        if not np.all(np.isfinite(cost)) or cost.min() < 0 or np.any(np.diag(cost) != 0):
            raise ConfigError("[links] cost must be finite, >= 0, with a zero diagonal")
        object.__setattr__(self, "link_cost", cost)

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def node_of_gpu(self) -> np.ndarray:
        """[num_gpus] node index of every GPU."""
        return np.arange(self.num_gpus) // self.gpus_per_node

    def to_dict(self) -> dict[str, Any]:
        return {
            "cluster": {"nodes": self.nodes, "gpus_per_node": self.gpus_per_node},
            "bandwidth": {"intra_node": self.intra_node_gbps, "inter_node": self.inter_node_gbps},
            "links": {"cost": self.link_cost.tolist()},
            "gpu": {
                "type": self.gpu.name,
                "hbm_gbps": self.gpu.hbm_gbps,
                "bf16_tflops": self.gpu.bf16_tflops,
                "fp8_tflops": self.gpu.fp8_tflops,
                "expert_weights": self.expert_weights,
            },
        }


def load_topology(path: Path) -> Topology:
    """Read the topology TOML of docs/placement.md (``[cluster]``, ``[bandwidth]``, optional
    ``[links] cost`` and ``[gpu]``). Errors name the file and the key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read ({e})") from e
    except tomllib.TOMLDecodeError as e:
        raise InputError(path, f"not valid TOML ({e})") from e
    cluster = data.get("cluster")
    if not isinstance(cluster, dict):
        raise InputError(path, "missing [cluster] table with nodes and gpus_per_node")
    bandwidth = data.get("bandwidth", {})
    links = data.get("links", {})
    try:
        for table, key in (("cluster", "nodes"), ("cluster", "gpus_per_node")):
            if not isinstance(cluster.get(key), int) or isinstance(cluster.get(key), bool):
                raise InputError(path, f"[{table}] {key} must be an integer")
        return Topology(
            nodes=cluster["nodes"],
            gpus_per_node=cluster["gpus_per_node"],
            intra_node_gbps=float(bandwidth.get("intra_node", 450.0)),
            inter_node_gbps=float(bandwidth.get("inter_node", 50.0)),
            link_cost=np.asarray(links.get("cost", np.zeros((0, 0))), dtype=np.float64),
            gpu=gpu_spec(data.get("gpu", {})),
            expert_weights=str(data.get("gpu", {}).get("expert_weights", "fp8")),
        )
    except (TypeError, ValueError) as e:
        raise InputError(path, f"invalid value ({e})") from e
    except ConfigError as e:
        raise InputError(path, str(e)) from e


def gpu_spec(table: Any) -> GpuSpec:
    """The ``[gpu]`` table: ``type`` (a preset of :data:`GPU_PRESETS`, default H100) and
    optional overrides ``hbm_gbps``, ``bf16_tflops``, ``fp8_tflops``."""
    if not isinstance(table, dict):
        raise ConfigError("[gpu] must be a table")
    name = table.get("type", DEFAULT_GPU)
    known = {"type", "hbm_gbps", "bf16_tflops", "fp8_tflops", "expert_weights"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"[gpu] unknown key(s) {', '.join(unknown)}; known: {sorted(known)}")
    base = GPU_PRESETS.get(name)
    overrides = {
        k: float(table[k]) for k in ("hbm_gbps", "bf16_tflops", "fp8_tflops") if k in table
    }
    if base is None:
        if len(overrides) < 3:
            raise ConfigError(
                f"[gpu] type {name!r} is not one of {', '.join(GPU_PRESETS)}; give "
                "hbm_gbps, bf16_tflops and fp8_tflops for another GPU"
            )
        return GpuSpec(str(name), **overrides)
    return replace(base, **overrides)  # type: ignore[arg-type]
