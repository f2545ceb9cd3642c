"""Run a placement method and write its directory: ``expert_location.json`` + ``plan.json``;
check an existing directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from scheduler import __version__
from scheduler.errors import InputError
from scheduler.jsonio import read_json, write_json_atomic
from scheduler.model_shape import ModelShape
from scheduler.placement.io import EXPERT_LOCATION, PLAN, read_sglang_file, to_sglang
from scheduler.placement.metrics import predicted_metrics
from scheduler.placement.placement import Placement
from scheduler.placement.problem import PlacementProblem, PlacementResult
from scheduler.placement.topology import Topology


def plan_json(
    problem: PlacementProblem, result: PlacementResult, fingerprints: dict[str, str]
) -> dict[str, Any]:
    metrics = predicted_metrics(
        problem.demand,
        problem.weights,
        problem.profile.model,
        result.placement,
        result.class_to_node_share,
        problem.topology,
    )
    metrics.update(modelled_step(problem, result))
    return {
        "format": "moe-scheduler-plan",
        "version": 1,
        "generator": f"moe-scheduler {__version__}",
        "method": result.method,
        "class_to_node_share": {
            name: [round(float(v), 6) for v in row]
            for name, row in zip(problem.class_names, result.class_to_node_share, strict=True)
        },
        "objective": result.objective,
        "bound": result.bound,
        "gap": result.gap,
        "solver": {
            "status": result.status,
            "seconds": round(result.solve_seconds, 3),
            "time_limit_s": problem.time_limit_s,
            "seed": problem.seed,
            "workers": problem.workers,
        },
        "predicted_metrics": metrics,
        "cluster": {
            "nodes": problem.topology.nodes,
            "gpus_per_node": problem.topology.gpus_per_node,
            "redundant_experts": problem.redundant_experts,
            "slots_per_gpu": problem.slots_per_gpu,
            "balance_tolerance": problem.balance_tolerance,
        },
        "objective_kind": problem.objective,
        "model": problem.profile.model.to_dict(),
        "inputs": fingerprints,
        "details": result.details,
    }


def modelled_step(problem: PlacementProblem, result: PlacementResult) -> dict[str, Any]:
    """The expected modelled MoE-layer time of the result at the problem's operating
    point (step_time.py), the same model for every method."""
    from scheduler.accounting.cost_model import CostModel
    from scheduler.placement.methods.ours_time import evaluate_rows
    from scheduler.placement.step_time import LayerCost

    cost = LayerCost.of(CostModel.from_topology(problem.topology), problem.profile.model)
    evals = evaluate_rows(problem, result.placement.phy2log, result.class_to_node_share, cost)
    point = problem.operating_point
    return {
        "operating_point": {"phase": point.phase, "tokens_per_rank": point.tokens_per_rank},
        "modelled_moe_layer_us": float(np.mean([e.time_us for e in evals])),
        "busiest_rank_copies_per_layer": float(np.mean([e.max_inter for e in evals])),
        "mean_rank_copies_per_layer": float(np.mean([e.mean_inter for e in evals])),
    }


def write_placement_dir(
    out: Path, problem: PlacementProblem, result: PlacementResult, fingerprints: dict[str, str]
) -> None:
    """Write both files into ``out`` atomically (a temporary directory renamed into place)."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_json_atomic(tmp / EXPERT_LOCATION, to_sglang(result.placement, problem.profile.model))
        write_json_atomic(tmp / PLAN, plan_json(problem, result, fingerprints), indent=2)
        if out.exists():
            for name in (EXPERT_LOCATION, PLAN):
                os.replace(tmp / name, out / name)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_placement_dir(
    directory: Path, model: ModelShape, topology: Topology
) -> tuple[Placement, dict[str, Any] | None]:
    """Validate ``expert_location.json`` (and ``plan.json`` if present) against a model
    and topology. Raises InputError naming the file and the problem."""
    placement = read_sglang_file(
        directory / EXPERT_LOCATION, model, topology.num_gpus, topology.gpus_per_node
    )
    plan_path = directory / PLAN
    plan = None
    if plan_path.exists():
        plan = read_json(plan_path)
        shares = plan.get("class_to_node_share") if isinstance(plan, dict) else None
        if not isinstance(shares, dict):
            raise InputError(plan_path, "missing class_to_node_share")
        for name, row in shares.items():
            if (
                not isinstance(row, list)
                or len(row) != topology.nodes
                or abs(sum(row) - 1) > 1e-4
                or min(row) < 0
            ):
                raise InputError(
                    plan_path,
                    f"class_to_node_share[{name!r}] must list {topology.nodes} "
                    "non-negative shares summing to 1",
                )
    return placement, plan
