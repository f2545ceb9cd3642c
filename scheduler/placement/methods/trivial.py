"""SGLang's default placement (``--init-expert-location trivial``) with round-robin ranks."""

from __future__ import annotations

import time

import numpy as np

from scheduler.placement.placement import Placement
from scheduler.placement.problem import PlacementProblem, PlacementResult


def uniform_shares(problem: PlacementProblem) -> np.ndarray:
    """Round-robin ranks: every class spread evenly over all nodes. [classes, nodes]."""
    n = problem.topology.nodes
    return np.full((len(problem.class_names), n), 1.0 / n)


def solve(problem: PlacementProblem) -> PlacementResult:
    start = time.perf_counter()
    m, t = problem.profile.model, problem.topology
    placement = Placement.trivial(
        m.num_moe_layers, m.num_experts, problem.num_slots, t.num_gpus, t.gpus_per_node
    )
    return PlacementResult(
        method="trivial",
        placement=placement,
        class_to_node_share=uniform_shares(problem),
        status="FIXED",
        solve_seconds=time.perf_counter() - start,
    )
