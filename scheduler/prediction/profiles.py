"""Workload profiles whose classes are activation clusters (input of the placement solve).

Every request of the routing set is assigned to a cluster (from the same decode-side
counts the clusters were fitted on; see :mod:`scheduler.prediction.training`) and its
routing is summed per phase into the cluster's class, as ``profile --by cluster`` does
with its own k-means.
"""

from __future__ import annotations

import numpy as np

from scheduler.model_shape import ModelShape
from scheduler.prediction.clusters import ActivationClusters
from scheduler.prediction.datasets import RoutingSet
from scheduler.prediction.text_routing import clusters_fingerprint
from scheduler.prediction.training import FitConfig, phase_pairs
from scheduler.profile import ClassProfile, WorkloadProfile
from scheduler.traces.store import PHASES


def assign_requests(
    clusters: ActivationClusters, routing: RoutingSet, model: ModelShape, fraction: float
) -> np.ndarray:
    """[n] cluster id of every request of ``routing``."""
    pairs = phase_pairs(routing, model.num_experts, fraction)
    assign = clusters.predict(routing.counts)
    assign[pairs["rows"]] = clusters.predict(pairs["decode"])
    return assign


def cluster_profile(
    clusters: ActivationClusters, routing: RoutingSet, model: ModelShape, config: FitConfig
) -> WorkloadProfile:
    assign = assign_requests(clusters, routing, model, config.prefill_fraction)
    tokens_total = sum(int(t.sum()) for t in routing.tokens.values())
    classes = {}
    for c in range(clusters.n_clusters):
        rows = assign == c
        if not rows.any():
            continue
        counts, tokens = {}, {}
        for phase in PHASES:
            if phase not in routing.phase_counts:
                continue
            take = rows & routing.present[phase]
            if take.any():
                counts[phase] = routing.phase_counts[phase][take].sum(axis=0)
                tokens[phase] = int(routing.tokens[phase][take].sum())
        mix: dict[str, int] = {}
        for i in np.flatnonzero(rows):
            label = routing.labels[i]
            if label is not None:
                mix[label] = mix.get(label, 0) + 1
        classes[f"cluster-{c}"] = ClassProfile(
            weight=sum(tokens.values()) / tokens_total if tokens_total else 0.0,
            counts=counts,
            requests=int(rows.sum()),
            tokens=tokens,
            label_mix=mix,
        )
    total = sum(c.weight for c in classes.values())
    if total > 0 and not np.isclose(total, 1.0):
        classes = {
            n: ClassProfile(c.weight / total, c.counts, c.requests, c.tokens, c.label_mix)
            for n, c in classes.items()
        }
    params = clusters.get_params()
    return WorkloadProfile(
        model=model,
        classes=classes,
        source={
            "classes_by": f"activation clusters (moe-scheduler fit: K={params['n_clusters']}, "
            f"features {params['features']}, seed {params['random_state']})",
            "clusters_sha256": clusters_fingerprint(clusters),
            "num_requests": len(routing),
            "nodes": config.nodes,
        },
    )
