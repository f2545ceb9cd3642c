"""What a configuration serves: the SGLang instances (each with its topology, placement
and plan), the model, per-class expert histograms and predictors, loaded and
cross-checked as one immutable object so that a reload either swaps all of it or none.

Ranks are numbered across the fleet: instance ``i``'s DP rank ``r`` is fleet rank
``first_rank + r``, and its node ``n`` is fleet node ``first_rank / G + n``. The fleet's
placement puts the instances' placements side by side (each keeps its own GPUs and
nodes), so the accounting and the policies see every instance at once. A *pool* is the
instances of one role (mixed, or prefill and decode): each pool has its own policy and
rank slots, over the pool's part of the fleet.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from scheduler.accounting import static_dispatch_table
from scheduler.accounting.metrics import bytes_per_copy
from scheduler.class_map import default_class_map
from scheduler.errors import ConfigError, InputError
from scheduler.model_shape import ModelShape, resolve_model
from scheduler.placement.io import EXPERT_LOCATION, PLAN
from scheduler.placement.placement import Placement
from scheduler.placement.plan import check_placement_dir
from scheduler.placement.topology import Topology, load_topology
from scheduler.prediction.bundle import PredictorBundle, load_bundle
from scheduler.prediction.text_routing import TextHistogramPredictor, clusters_fingerprint
from scheduler.profile import load_profile
from scheduler.server.config import InstanceSection, ServerConfig
from scheduler.sglang_versions import SglangVersion

#: Environment variable with the expected placement version (see ClusterSection).
PLACEMENT_VERSION_ENV = "MOE_SCHEDULER_PLACEMENT_VERSION"


@dataclass(frozen=True)
class InstanceState:
    """One SGLang instance: its fleet ranks ``[first_rank, first_rank + num_ranks)``,
    placement and files as served. ``sglang_version``: from the configuration, else None
    until the instance's ``/server_info`` says it (the core keeps what it read)."""

    name: str
    url: str
    role: str
    first_rank: int
    topology: Topology
    placement: Placement
    plan: dict[str, Any]
    version: str
    expert_location_text: str
    plan_text: str
    class_to_node_share: dict[str, list[float]]
    sglang_version: SglangVersion | None
    bootstrap_port: int

    @property
    def num_ranks(self) -> int:
        return self.topology.num_gpus

    @property
    def ranks(self) -> range:
        return range(self.first_rank, self.first_rank + self.num_ranks)

    @property
    def bootstrap_host(self) -> str:
        return urlsplit(self.url).hostname or ""


@dataclass(frozen=True)
class Pool:
    """The instances of one role, side by side: the pool's rank ``r`` is fleet rank
    ``first_rank + r``. ``placement`` / ``class_to_node_share``: the pool's part of the
    fleet, what its policy routes on."""

    role: str
    instances: tuple[InstanceState, ...]
    first_rank: int
    placement: Placement
    class_to_node_share: dict[str, list[float]]

    @property
    def num_ranks(self) -> int:
        return self.placement.num_gpus

    def instance_of(self, rank: int) -> InstanceState:
        """The instance of pool rank ``rank``."""
        fleet_rank = self.first_rank + rank
        for inst in self.instances:
            if fleet_rank < inst.first_rank + inst.num_ranks:
                return inst
        raise IndexError(f"pool rank {rank} out of range")


@dataclass(frozen=True)
class ClusterState:
    """The fleet. ``class_shares[c]``: [moe_layers, experts] share of class ``c``'s routed
    (token, expert) pairs per layer (rows sum to ``top_k``), from the prediction profile.
    ``node_present``: [moe_layers * experts, fleet nodes] 1 where the node holds a replica.
    ``dest_gpu``: [fleet ranks, layers, experts] each instance's SGLang static dispatch
    table, in fleet GPU numbers, for the accounting. ``version``: the placement
    fingerprint (of the one instance's files; of all instances' fingerprints when there
    are several)."""

    model: ModelShape
    topology: Topology
    placement: Placement
    instances: tuple[InstanceState, ...]
    pools: dict[str, Pool]
    version: str
    class_to_node_share: dict[str, list[float]]
    class_shares: dict[str, np.ndarray]
    class_map: dict[str, str]
    bundle: PredictorBundle | None
    node_present: np.ndarray
    dest_gpu: np.ndarray
    #: Inter-node bytes of one token copy (FP8 dispatch + BF16 combine).
    bytes_per_copy: int
    #: Which predictor text mode uses ("class_map" or "text_cluster") and why.
    text_predictor: str = "class_map"
    text_predictor_why: str = "no predictor bundle"
    #: The learned text -> (cluster, histogram) predictor, when it is in force; its
    #: shares are the plan classes' (rows sum to top_k).
    text_histogram: TextHistogramPredictor | None = None

    @property
    def num_ranks(self) -> int:
        return self.topology.num_gpus

    @property
    def disaggregated(self) -> bool:
        return "prefill" in self.pools

    @property
    def serving_pool(self) -> Pool:
        """The pool whose instances answer the client (mixed, or decode)."""
        return self.pools["decode" if self.disaggregated else "mixed"]

    def instance_of(self, fleet_rank: int) -> InstanceState:
        for inst in self.instances:
            if fleet_rank < inst.first_rank + inst.num_ranks:
                return inst
        raise IndexError(f"fleet rank {fleet_rank} out of range")


def _load_instance(
    inst: InstanceSection, first_rank: int, label: str
) -> tuple[ModelShape, InstanceState]:
    """One instance's placement directory, checked against its model and topology;
    ``label`` starts error messages ("cluster." or "backend.instances[i] (name): ")."""
    directory = inst.placement
    plan_path, location_path = directory / PLAN, directory / EXPERT_LOCATION
    if not directory.is_dir():
        raise ConfigError(f"{label}placement: {directory} is not a directory")
    if not plan_path.exists():
        raise InputError(plan_path, "missing; the placement must be `moe-scheduler place` output")
    try:
        plan_bytes = plan_path.read_bytes()
        location_bytes = location_path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{label}placement: {e}") from e
    try:
        plan = json.loads(plan_bytes)
    except ValueError as e:
        raise InputError(plan_path, f"not JSON ({e})") from e
    if not isinstance(plan, dict):
        raise InputError(plan_path, "not a plan object")
    if inst.model:
        model = resolve_model(inst.model)
    else:
        model = ModelShape.from_dict(plan.get("model"), plan_path)
    if inst.topology is not None:
        topology = load_topology(inst.topology)
    else:
        cluster = plan.get("cluster", {})
        try:
            topology = Topology(int(cluster["nodes"]), int(cluster["gpus_per_node"]))
        except (KeyError, TypeError, ValueError):
            raise InputError(plan_path, "cluster.nodes / gpus_per_node missing") from None
    placement, checked_plan = check_placement_dir(directory, model, topology)
    assert checked_plan is not None
    shares = {k: [float(v) for v in row] for k, row in checked_plan["class_to_node_share"].items()}
    return model, InstanceState(
        name=inst.name,
        url=inst.url.rstrip("/"),
        role=inst.role,
        first_rank=first_rank,
        topology=topology,
        placement=placement,
        plan=plan,
        version=hashlib.sha256(location_bytes + b"\0" + plan_bytes).hexdigest()[:16],
        expert_location_text=location_bytes.decode("utf-8"),
        plan_text=plan_bytes.decode("utf-8"),
        class_to_node_share=shares,
        sglang_version=SglangVersion.parse(inst.sglang_version) if inst.sglang_version else None,
        bootstrap_port=inst.bootstrap_port,
    )


def side_by_side(placements: list[Placement]) -> Placement:
    """The placements of several instances as one, GPU after GPU. Instances with fewer
    slots per GPU are padded with copies of each GPU's last slot, which changes no GPU's
    or node's set of experts (what routing and accounting read)."""
    width = max(p.slots_per_gpu for p in placements)
    blocks = []
    for p in placements:
        per_gpu = p.phy2log.reshape(p.num_layers, p.num_gpus, p.slots_per_gpu)
        pad = np.repeat(per_gpu[:, :, -1:], width - p.slots_per_gpu, axis=2)
        blocks.append(np.concatenate([per_gpu, pad], axis=2))
    first = placements[0]
    phy2log = np.concatenate(blocks, axis=1).reshape(first.num_layers, -1)
    gpus = sum(p.num_gpus for p in placements)
    return Placement(phy2log, first.num_experts, gpus, first.gpus_per_node)


def _shares_side_by_side(instances: tuple[InstanceState, ...]) -> dict[str, list[float]]:
    """Each class's node shares over the instances' nodes together, summing to 1 (an
    instance whose plan lacks the class contributes zeros)."""
    classes = sorted({c for inst in instances for c in inst.class_to_node_share})
    out = {}
    for c in classes:
        row = np.concatenate(
            [
                np.asarray(inst.class_to_node_share.get(c, [0.0] * inst.topology.nodes))
                for inst in instances
            ]
        )
        total = row.sum()
        out[c] = (row / total if total > 0 else np.full(row.size, 1 / row.size)).tolist()
    return out


def _pool(role: str, instances: tuple[InstanceState, ...]) -> Pool:
    return Pool(
        role,
        instances,
        instances[0].first_rank,
        side_by_side([i.placement for i in instances]),
        _shares_side_by_side(instances),
    )


def load_cluster(config: ServerConfig) -> ClusterState:
    """Load everything ``config`` points at; ConfigError/InputError name the problem."""
    instances: list[InstanceState] = []
    model: ModelShape | None = None
    first_rank = 0
    for i, section in enumerate(config.instances):
        label = (
            f"backend.instances[{i}] ({section.name}) " if config.instance_tables else "cluster."
        )
        shape, inst = _load_instance(section, first_rank, label)
        if model is not None and shape != model:
            raise ConfigError(
                f"instance {inst.name} serves {shape.name}, instance {instances[0].name} "
                f"{model.name}: every instance must serve the same model"
            )
        if instances and inst.topology.gpus_per_node != instances[0].topology.gpus_per_node:
            raise ConfigError(
                f"instance {inst.name} has {inst.topology.gpus_per_node} GPUs per node, instance "
                f"{instances[0].name} {instances[0].topology.gpus_per_node}: the scheduler needs "
                "the same number of GPUs per node on every instance"
            )
        model = shape
        instances.append(inst)
        first_rank += inst.num_ranks
    assert model is not None, "a checked configuration has at least one instance"
    fleet = tuple(instances)
    pools = {
        role: _pool(role, tuple(i for i in fleet if i.role == role))
        for role in dict.fromkeys(i.role for i in fleet)
    }
    placement = side_by_side([i.placement for i in fleet])
    topology = Topology(placement.num_nodes, placement.gpus_per_node)
    dest_gpu = np.concatenate(
        [static_dispatch_table(i.placement) + i.first_rank for i in fleet], axis=0
    )

    class_shares: dict[str, np.ndarray] = {}
    profile_source: dict[str, Any] | None = None
    if config.prediction.profile is not None:
        profile = load_profile(config.prediction.profile)
        profile_source = profile.source
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
    shares = _shares_side_by_side(fleet)
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
    text_predictor, why, histogram = _text_predictor(
        bundle, set(shares), class_shares, profile_source, model
    )
    if len(fleet) == 1:
        version = fleet[0].version
    else:
        joined = ";".join(f"{i.name}={i.version}" for i in fleet)
        version = hashlib.sha256(joined.encode()).hexdigest()[:16]
    expected = config.cluster.placement_version or os.environ.get(PLACEMENT_VERSION_ENV, "")
    if expected and expected != version:
        where = fleet[0].placement if len(fleet) == 1 else Path("the instances' placements")
        raise ConfigError(
            f"placement {where} has version {version}, but {expected} is expected "
            f"(cluster.placement_version / {PLACEMENT_VERSION_ENV}); refusing to serve it"
        )
    return ClusterState(
        model=model,
        topology=topology,
        placement=placement,
        instances=fleet,
        pools=pools,
        version=version,
        class_to_node_share=shares,
        class_shares=class_shares,
        class_map=class_map,
        bundle=bundle,
        node_present=placement.node_presence(),
        bytes_per_copy=bytes_per_copy(model.hidden_size).total,
        dest_gpu=np.ascontiguousarray(dest_gpu, dtype=np.int32),
        text_predictor=text_predictor,
        text_predictor_why=why,
        text_histogram=histogram,
    )


def _text_predictor(
    bundle: PredictorBundle | None,
    plan_classes: set[str],
    class_shares: dict[str, np.ndarray],
    profile_source: dict[str, Any] | None,
    model: ModelShape,
) -> tuple[str, str, TextHistogramPredictor | None]:
    """Which predictor text mode uses (docs/server.md, "Text predictor"): the bundle's
    learned text -> cluster predictor when the bundle records that it beat the class map
    on held-out pairs and the plan's classes are the bundle's clusters (``cluster-<c>``,
    as ``fit --profile-out`` names them, and the prediction profile, when it names the
    clusters it was made from, made from these); else the class map. Returns
    (name, why, predictor or None)."""
    if bundle is None:
        return "class_map", "no predictor bundle", None
    if bundle.text_cluster is None:
        return "class_map", "the bundle has no text-to-cluster classifier", None
    if bundle.clusters is None:
        return "class_map", "the bundle's clusters were fitted for another model", None
    choice = bundle.metadata.get("text_predictor")
    if not isinstance(choice, dict) or choice.get("use") != "text_cluster":
        why = choice.get("why") if isinstance(choice, dict) else None
        return (
            "class_map",
            f"the learned predictor did not win in fit: {why or 'not recorded'}",
            None,
        )
    clusters = bundle.clusters
    used = [c for c in range(clusters.n_clusters) if clusters.cluster_counts_[c].sum() > 0]
    names = [f"cluster-{c}" for c in used]
    missing = [n for n in names if n not in plan_classes]
    if missing:
        return (
            "class_map",
            f"the plan's classes ({', '.join(sorted(plan_classes))}) are not the bundle's "
            f"clusters ({', '.join(names)}): place from `fit --profile-out`'s profile to use "
            "the learned predictor",
            None,
        )
    made_from = (profile_source or {}).get("clusters_sha256")
    if made_from is not None and made_from != clusters_fingerprint(clusters):
        return (
            "class_map",
            "prediction.profile was made from other clusters than the bundle's",
            None,
        )
    own = clusters.cluster_counts_
    sums = own.sum(axis=2, keepdims=True)
    shares = np.divide(own, sums, out=np.zeros_like(own), where=sums > 0) * model.top_k
    for c in used:
        if f"cluster-{c}" in class_shares:
            shares[c] = class_shares[f"cluster-{c}"]
    why = str(choice.get("why", "beat the class map on held-out pairs"))
    return "text_cluster", why, TextHistogramPredictor(bundle.text_cluster, shares)
