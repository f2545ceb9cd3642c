"""The placement problem (inputs) and result (outputs) shared by every method."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from scheduler.errors import ConfigError
from scheduler.placement.placement import Placement
from scheduler.placement.step_time import OperatingPoint
from scheduler.placement.topology import Topology
from scheduler.profile import WorkloadProfile

#: What ``ours`` minimises: the modelled MoE-layer time at the operating point, or (for
#: comparison) the expected remote (token, expert) hits.
OBJECTIVES = ("time", "remote-hits")


@dataclass(frozen=True)
class PlacementProblem:
    """Everything a method may use.

    demand: [classes, layers, experts] token counts per class (decode, else prefill, else
    mixed); weights: [classes] token shares. ``current`` and ``max_moves`` ask for a
    re-placement that moves at most ``max_moves`` expert weights. ``objective`` and
    ``operating_point`` are what ``ours`` optimises (other methods ignore them; the plan's
    predicted metrics report the time at the operating point for every method).
    """

    profile: WorkloadProfile
    topology: Topology
    redundant_experts: int = 0
    balance_tolerance: float = 0.10
    time_limit_s: float = 30.0
    seed: int = 0
    workers: int = 1
    current: Placement | None = None
    max_moves: int | None = None
    objective: str = "time"
    operating_point: OperatingPoint = field(default_factory=OperatingPoint)

    def __post_init__(self) -> None:
        m, t = self.profile.model, self.topology
        slots = m.num_experts + self.redundant_experts
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}"
            )
        if self.redundant_experts < 0:
            raise ConfigError(f"--redundant-experts must be >= 0, got {self.redundant_experts}")
        if slots % t.num_gpus:
            raise ConfigError(
                f"cannot split {m.num_experts} experts + {self.redundant_experts} redundant = "
                f"{slots} slots equally over {t.num_gpus} GPUs (SGLang needs equal slots per "
                f"GPU): choose --redundant-experts so that the total is a multiple of "
                f"{t.num_gpus}"
            )
        if self.balance_tolerance < 0:
            raise ConfigError(f"--balance-tolerance must be >= 0, got {self.balance_tolerance}")
        if self.time_limit_s <= 0:
            raise ConfigError(f"--time-limit must be > 0, got {self.time_limit_s}")
        if self.max_moves is not None and self.current is None:
            raise ConfigError("--max-moves needs the current placement (--current DIR)")

    @property
    def class_names(self) -> list[str]:
        return list(self.profile.classes)

    @cached_property
    def demand(self) -> np.ndarray:
        """Built once per problem (every method and metric reads it); read-only."""
        demand = np.stack([c.placement_counts() for c in self.profile.classes.values()])
        demand.setflags(write=False)
        return demand

    @cached_property
    def weights(self) -> np.ndarray:
        w = np.array([c.weight for c in self.profile.classes.values()], dtype=np.float64)
        return w / w.sum()

    @property
    def num_slots(self) -> int:
        return self.profile.model.num_experts + self.redundant_experts

    @property
    def slots_per_gpu(self) -> int:
        return self.num_slots // self.topology.num_gpus


@dataclass
class PlacementResult:
    """A method's answer. class_to_node_share: [classes, nodes], rows sum to 1.

    objective / bound are in the method's own objective units (ours: expected remote
    (token, expert) hits, weighted by link cost); bound is None when the method proves none.
    """

    method: str
    placement: Placement
    class_to_node_share: np.ndarray
    status: str
    solve_seconds: float
    objective: float | None = None
    bound: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def gap(self) -> float | None:
        if self.objective is None or self.bound is None:
            return None
        if self.objective == 0:
            return 0.0
        return max(0.0, (self.objective - self.bound) / abs(self.objective))


def combined_layer_status(statuses: list[str]) -> str:
    """One status for per-layer solves: OPTIMAL if every layer is, FEASIBLE if every
    layer is OPTIMAL or FEASIBLE, else FALLBACK: some layer fell back to its heuristic
    (marked ``FALLBACK``, or left with the solver's own status name when it found no
    solution: ``UNKNOWN``, ``INFEASIBLE``, ``MODEL_INVALID``)."""
    if all(s == "OPTIMAL" for s in statuses):
        return "OPTIMAL"
    return "FEASIBLE" if all(s in ("OPTIMAL", "FEASIBLE") for s in statuses) else "FALLBACK"


def balanced_class_shares(weights: np.ndarray, nodes: int) -> np.ndarray:
    """[classes, nodes] shares: every node serves an equal share of requests.

    Classes are laid end to end on [0, 1) in order and cut at multiples of 1/nodes, so each
    class lands on as few nodes as possible (one when its weight allows) and node request
    load is exactly balanced. Used when a method has no class-to-node decision of its own
    and as our solver's starting point.
    """
    order = np.argsort(-weights, kind="stable")
    shares = np.zeros((len(weights), nodes))
    start = 0.0
    for c in order:
        end = start + weights[c]
        for n in range(nodes):
            lo, hi = max(start, n / nodes), min(end, (n + 1) / nodes)
            if hi > lo:
                shares[c, n] = (hi - lo) / weights[c] if weights[c] > 0 else 0
        start = end
    zero = weights <= 0
    shares[zero] = 1.0 / nodes
    return shares / shares.sum(axis=1, keepdims=True)
