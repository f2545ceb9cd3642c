"""Ours: choose the number of clusters and the activation features by measured benefit.

Every candidate (features x layer subset x K) is fitted on the training folds and
scored on the held-out fold by the hot-set locality proxy of
:mod:`scheduler.prediction.locality` (fraction of activations that stay on the node of
the request's cluster, ``N`` nodes of ``E / N`` experts per layer); the best mean over
folds wins, ties going to the smaller K. Inertia and silhouette are recorded beside it
so a report can show what they would have picked. ``K`` ranges over ``1..N`` because
the optimistic proxy gives each cluster its own node.

Three count arrays allow the online setting to be measured: clusters are fitted on
``fit_counts`` (the decode routing of past requests), a new request is assigned from
``assign_counts`` (what is known when it is placed, e.g. its prefill) and scored on
``eval_counts`` (its decode). All are [n, layers, experts]; by default all three are
the same array.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from scheduler.prediction.clusters import FEATURES, ActivationClusters
from scheduler.prediction.locality import (
    hot_set_mask,
    locality,
    partition_mask,
    per_node_capacity,
)

LAYER_SETS = ("all", "first-half", "second-half")


def layer_subset(name: str, num_layers: int) -> tuple[int, ...] | None:
    """MoE layer indices of a named subset (None = all layers)."""
    half = num_layers // 2
    if name == "all":
        return None
    if name == "first-half":
        return tuple(range(max(half, 1)))
    if name == "second-half":
        return tuple(range(half, num_layers))
    raise ValueError(f"layer subset must be one of {LAYER_SETS}, got {name!r}")


@dataclass(frozen=True)
class ClusterCandidate:
    """One configuration's scores (means over folds unless noted)."""

    features: str
    layers: str
    k: int
    locality: float
    locality_std: float
    partition_locality: float | None
    inertia: float
    silhouette: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def make_clusters(
    features: str, layers: str, k: int, num_layers: int, per_node: int, random_state: int
) -> ActivationClusters:
    return ActivationClusters(
        k,
        features=features,
        layers=layer_subset(layers, num_layers),
        top_m=per_node if features == "top-mask" else None,
        random_state=random_state,
    )


def score_clusters(
    model: ActivationClusters,
    per_node: int,
    assign_counts: np.ndarray,
    eval_counts: np.ndarray,
) -> tuple[float, float | None]:
    """(hot-set locality, partition locality or None unless K * per_node == E) of a
    fitted model: requests assigned from ``assign_counts``, scored on ``eval_counts``."""
    assign = model.predict(assign_counts)
    hot = locality(hot_set_mask(model.cluster_counts_, per_node), assign, eval_counts)
    k, _, experts = model.cluster_counts_.shape
    part = None
    if k * per_node == experts:
        part = locality(partition_mask(model.cluster_counts_, per_node), assign, eval_counts)
    return hot, part


def _folds(n: int, labels: np.ndarray | None, folds: int, random_state: int) -> list[Any]:
    from sklearn.model_selection import KFold, StratifiedKFold

    if labels is not None and np.unique(labels, return_counts=True)[1].min() >= folds:
        splitter = StratifiedKFold(folds, shuffle=True, random_state=random_state)
        return list(splitter.split(np.zeros(n), labels))
    return list(KFold(folds, shuffle=True, random_state=random_state).split(np.zeros(n)))


def select_clusters(
    fit_counts: np.ndarray,
    *,
    nodes: int,
    assign_counts: np.ndarray | None = None,
    eval_counts: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    ks: Sequence[int] | None = None,
    features: Sequence[str] = FEATURES,
    layer_sets: Sequence[str] = LAYER_SETS,
    folds: int = 3,
    random_state: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[ActivationClusters, list[ClusterCandidate]]:
    """Grid-search clusters by cross-validated hot-set locality.

    Returns the winning configuration, refitted on all of ``fit_counts``, and every
    candidate's scores (best first). ``labels`` (optional) stratify the folds.
    """
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    # Many small k-means fits: OpenMP start-up per fit costs more than the fit itself.
    with threadpool_limits(limits=1):
        return _select(
            fit_counts,
            nodes,
            assign_counts,
            eval_counts,
            labels,
            ks,
            features,
            layer_sets,
            folds,
            random_state,
            progress,
        )


def _select(
    fit_counts: np.ndarray,
    nodes: int,
    assign_counts: np.ndarray | None,
    eval_counts: np.ndarray | None,
    labels: np.ndarray | None,
    ks: Sequence[int] | None,
    features: Sequence[str],
    layer_sets: Sequence[str],
    folds: int,
    random_state: int,
    progress: Callable[[str], None] | None,
) -> tuple[ActivationClusters, list[ClusterCandidate]]:
    from sklearn.metrics import silhouette_score

    n, num_layers, experts = fit_counts.shape
    per_node = per_node_capacity(experts, nodes)
    assign_counts = fit_counts if assign_counts is None else assign_counts
    eval_counts = fit_counts if eval_counts is None else eval_counts
    splits = _folds(n, labels, folds, random_state)
    max_k = min(nodes, min(len(train) for train, _ in splits))
    ks = [k for k in (ks or range(1, nodes + 1)) if 1 <= k <= max_k]
    grid = [("share", "all", 1)] if 1 in ks else []
    grid += [(f, lay, k) for k in ks if k > 1 for f in features for lay in layer_sets]
    candidates = []
    for i, (feat, lay, k) in enumerate(grid):
        hot: list[float] = []
        part: list[float] = []
        for train, test in splits:
            model = make_clusters(feat, lay, k, num_layers, per_node, random_state)
            model.fit(fit_counts[train])
            h, p = score_clusters(model, per_node, assign_counts[test], eval_counts[test])
            hot.append(h)
            if p is not None:
                part.append(p)
        full = make_clusters(feat, lay, k, num_layers, per_node, random_state).fit(fit_counts)
        sil = None
        if 1 < k < n and len(np.unique(full.labels_)) > 1:
            sil = float(silhouette_score(full.transform(fit_counts), full.labels_))
        candidates.append(
            ClusterCandidate(
                features=feat,
                layers=lay,
                k=k,
                locality=float(np.mean(hot)),
                locality_std=float(np.std(hot)),
                partition_locality=float(np.mean(part)) if part else None,
                inertia=full.inertia_,
                silhouette=sil,
            )
        )
        if progress:
            progress(f"clusters: scored {i + 1}/{len(grid)} candidates")
    order = {f: j for j, f in enumerate(FEATURES)}
    candidates.sort(key=lambda c: (-round(c.locality, 6), c.k, order.get(c.features, 9)))
    best = candidates[0]
    model = make_clusters(best.features, best.layers, best.k, num_layers, per_node, random_state)
    return model.fit(fit_counts), candidates
