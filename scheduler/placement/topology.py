"""Cluster topology: nodes x GPUs, bandwidths, and the link cost between nodes."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scheduler.errors import ConfigError, InputError


@dataclass(frozen=True)
class Topology:
    """``nodes`` x ``gpus_per_node`` GPUs; DP-attention rank r sits on GPU r, node r // G.

    Bandwidths are GB/s per GPU per direction. ``link_cost [nodes, nodes]`` weighs a
    token sent from node a to node b (0 on the diagonal; 1 elsewhere by default, i.e. every
    remote hit costs the same on a uniform fabric).
    """

    nodes: int
    gpus_per_node: int
    intra_node_gbps: float = 450.0
    inter_node_gbps: float = 50.0
    link_cost: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))

    def __post_init__(self) -> None:
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
        }


def load_topology(path: Path) -> Topology:
    """Read the topology TOML of design.md (``[cluster]``, ``[bandwidth]``, optional
    ``[links] cost``). Errors name the file and the key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(path, f"not valid TOML ({e})") from None
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
        )
    except (TypeError, ValueError) as e:
        raise InputError(path, f"invalid value ({e})") from None
    except ConfigError as e:
        raise InputError(path, str(e)) from None
