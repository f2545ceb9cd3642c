"""What a configuration serves: the model, topology, placement, plan, per-class expert
histograms and predictors, loaded and cross-checked as one immutable object so that a
reload either swaps all of it or none of it."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from scheduler.accounting import static_dispatch_table
from scheduler.accounting.metrics import bytes_per_copy
from scheduler.emulator.workload import default_class_map
from scheduler.errors import ConfigError, InputError
from scheduler.model_shape import ModelShape, resolve_model
from scheduler.placement.io import EXPERT_LOCATION, PLAN
from scheduler.placement.placement import Placement
from scheduler.placement.plan import check_placement_dir
from scheduler.placement.topology import Topology, load_topology
from scheduler.prediction.bundle import PredictorBundle, load_bundle
from scheduler.profile import load_profile
from scheduler.server.config import ServerConfig

#: Environment variable with the expected placement version (see ClusterSection).
PLACEMENT_VERSION_ENV = "MOE_SCHEDULER_PLACEMENT_VERSION"


@dataclass(frozen=True)
class ClusterState:
    """``class_shares[c]``: [moe_layers, experts] share of class ``c``'s routed (token,
    expert) pairs per layer (rows sum to ``top_k``), from the prediction profile.
    ``node_present``: [moe_layers * experts, nodes] 1 where the node holds a replica.
    ``dest_gpu``: SGLang's static dispatch table, for the accounting."""

    model: ModelShape
    topology: Topology
    placement: Placement
    plan: dict[str, Any]
    version: str
    expert_location_text: str
    plan_text: str
    class_to_node_share: dict[str, list[float]]
    class_shares: dict[str, np.ndarray]
    class_map: dict[str, str]
    bundle: PredictorBundle | None
    node_present: np.ndarray
    dest_gpu: np.ndarray
    #: Inter-node bytes of one token copy (FP8 dispatch + BF16 combine).
    bytes_per_copy: int

    @property
    def num_ranks(self) -> int:
        return self.topology.num_gpus


def load_cluster(config: ServerConfig) -> ClusterState:
    """Load everything ``config`` points at; ConfigError/InputError name the problem."""
    directory = config.cluster.placement
    plan_path, location_path = directory / PLAN, directory / EXPERT_LOCATION
    if not directory.is_dir():
        raise ConfigError(f"cluster.placement: {directory} is not a directory")
    if not plan_path.exists():
        raise InputError(
            plan_path, "missing; cluster.placement must be `moe-scheduler place` output"
        )
    try:
        plan_bytes = plan_path.read_bytes()
        location_bytes = location_path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cluster.placement: {e}") from None
    try:
        plan = json.loads(plan_bytes)
    except ValueError as e:
        raise InputError(plan_path, f"not JSON ({e})") from None
    if not isinstance(plan, dict):
        raise InputError(plan_path, "not a plan object")
    model = (
        resolve_model(config.cluster.model)
        if config.cluster.model
        else ModelShape.from_dict(plan.get("model"), plan_path)
    )
    if config.cluster.topology is not None:
        topology = load_topology(config.cluster.topology)
    else:
        cluster = plan.get("cluster", {})
        try:
            topology = Topology(int(cluster["nodes"]), int(cluster["gpus_per_node"]))
        except (KeyError, TypeError, ValueError):
            raise InputError(plan_path, "cluster.nodes / gpus_per_node missing") from None
    placement, checked_plan = check_placement_dir(directory, model, topology)
    assert checked_plan is not None
    shares = {k: [float(v) for v in row] for k, row in checked_plan["class_to_node_share"].items()}

    class_shares: dict[str, np.ndarray] = {}
    if config.prediction.profile is not None:
        profile = load_profile(config.prediction.profile)
        if profile.model != model:
            raise ConfigError(
                f"prediction.profile {config.prediction.profile} is for model "
                f"{profile.model.name}, the placement for {model.name}"
            )
        for name, cls in profile.classes.items():
            counts = cls.placement_counts()
            per_layer = counts.sum(axis=1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                class_shares[name] = np.where(per_layer > 0, counts / per_layer, 0) * model.top_k
    classes = set(shares) | set(class_shares)
    class_map = dict(config.prediction.class_map) or default_class_map(classes)
    for domain, name in class_map.items():
        if name not in classes:
            raise ConfigError(
                f"prediction.class_map {domain} = {name!r}: no such class in the plan "
                f"or profile ({', '.join(sorted(classes))})"
            )
    bundle = None
    if config.prediction.bundle is not None:
        bundle = load_bundle(config.prediction.bundle)
        if bundle.model is not None and bundle.model != model:
            bundle.prefill_decode = None  # fitted for another model: its routing parts are unusable
            bundle.clusters = None
    version = hashlib.sha256(location_bytes + b"\0" + plan_bytes).hexdigest()[:16]
    expected = config.cluster.placement_version or os.environ.get(PLACEMENT_VERSION_ENV, "")
    if expected and expected != version:
        raise ConfigError(
            f"cluster.placement {directory} has version {version}, but {expected} is expected "
            f"(cluster.placement_version / {PLACEMENT_VERSION_ENV}); refusing to serve it"
        )
    return ClusterState(
        model=model,
        topology=topology,
        placement=placement,
        plan=plan,
        version=version,
        expert_location_text=location_bytes.decode("utf-8"),
        plan_text=plan_bytes.decode("utf-8"),
        class_to_node_share=shares,
        class_shares=class_shares,
        class_map=class_map,
        bundle=bundle,
        node_present=placement.node_presence(),
        bytes_per_copy=bytes_per_copy(model.hidden_size).total,
        dest_gpu=static_dispatch_table(placement),
    )
