"""Placement files: SGLang's ``expert_location.json`` and our ``plan.json``."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from scheduler.errors import InputError
from scheduler.jsonio import read_json
from scheduler.model_shape import ModelShape
from scheduler.placement.placement import Placement, placement_problems

EXPERT_LOCATION = "expert_location.json"
PLAN = "plan.json"


def to_sglang(placement: Placement, model: ModelShape) -> dict[str, list[list[int]]]:
    """``{"physical_to_logical_map": [[...]]}``: one row per hidden layer (SGLang requires
    dense layers too and ignores them; they get the trivial row), nothing else."""
    trivial = (np.arange(placement.num_slots) % model.num_experts).tolist()
    rows = [trivial] * model.num_hidden_layers
    for j, layer in enumerate(model.moe_layer_ids):
        rows[layer] = placement.phy2log[j].tolist()
    return {"physical_to_logical_map": rows}


def from_sglang(
    data: Any, model: ModelShape, num_gpus: int, gpus_per_node: int, path: Path | None = None
) -> Placement:
    """Read SGLang's ``physical_to_logical_map`` back (MoE rows only), validating it."""
    if not isinstance(data, dict):
        raise InputError(path, "expected a JSON object with physical_to_logical_map")
    extra = sorted(set(data) - {"physical_to_logical_map"})
    if extra:
        raise InputError(
            path,
            f"extra key(s) {extra}: SGLang passes the object as keyword arguments "
            "and rejects anything but physical_to_logical_map",
        )
    if "physical_to_logical_map" not in data:
        raise InputError(path, "missing physical_to_logical_map")
    rows = data["physical_to_logical_map"]
    try:
        values = np.asarray(rows, dtype=np.float64)
        if not np.all(values == np.round(values)):
            raise InputError(path, "physical_to_logical_map holds non-integer expert ids")
        phy2log = values.astype(np.int64)
    except (TypeError, ValueError):
        raise InputError(
            path, "physical_to_logical_map rows differ in width or are not integers"
        ) from None
    if phy2log.ndim != 2 or phy2log.shape[0] != model.num_hidden_layers:
        raise InputError(
            path,
            f"physical_to_logical_map has shape {phy2log.shape}; SGLang needs one row "
            f"per hidden layer ({model.num_hidden_layers} for {model.name}, dense layers included)",
        )
    moe = phy2log[list(model.moe_layer_ids)]
    problems = placement_problems(moe, model.num_experts, num_gpus)
    if problems:
        raise InputError(path, "; ".join(problems))
    return Placement(moe, model.num_experts, num_gpus, gpus_per_node)


def read_sglang_file(path: Path, model: ModelShape, num_gpus: int, gpus_per_node: int) -> Placement:
    return from_sglang(read_json(path), model, num_gpus, gpus_per_node, path)


def fingerprint(path: Path) -> str:
    """sha256 of a file's bytes, for plan.json's input fingerprints."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
