"""Text -> routing: a request's cluster and expert histogram guessed from its prompt,
scored on held-out (prompt, routed experts) pairs against the two baselines.

Predictors compared on the same held-out pairs (the clusters, and so the placement they
stand for, are fixed: the fitted :class:`ActivationClusters`):

* ``text_cluster`` (learned): :class:`TextClusterClassifier` gives ``p(cluster | text)``;
  the request goes to the most probable cluster's node, and its predicted histogram is
  the probability-weighted mixture of the clusters' per-layer expert shares
  (:class:`TextHistogramPredictor`; ``histogram_argmax`` scores the most probable
  cluster's shares alone).
* ``class_map`` (today's text mode on pair data): the domain classifier predicts each
  pair's domain; a domain's histogram is the mean per-layer shares of the *training*
  pairs whose predicted domain is the same, and its cluster the one most of those
  training pairs belong to (the class map learned from the pairs). A domain no training
  pair was predicted as gets the training mean and the largest cluster.
* ``one_cluster``: no prediction. Every request gets the training mean shares, and the
  placement is one hot set of the training pairs' most used experts (cluster accuracy:
  the share of held-out pairs in the largest training cluster).
* ``true_cluster``: the held-out pair's own cluster (from its routed experts), the
  bound any text predictor can reach with these clusters.

Figures: cluster ``accuracy`` against the pair's true cluster; ``pearson`` (per-layer
Pearson of predicted vs true expert shares, averaged as
:func:`~scheduler.prediction.prefill_decode.evaluate_prediction` does); ``locality``
(:mod:`scheduler.prediction.locality` hot-set proxy: the share of the held-out pairs'
activations that hit their assigned cluster's node). The learning curve repeats them for
the predictors fitted on the first 25, 50, 100, 200, ... training pairs (a random order
per seed), so an operator sees how many finished requests the feedback loop needs.

**Which text predictor serves** (:func:`choose_text_predictor`): the learned one when on
at least :data:`MIN_DECISION_PAIRS` held-out pairs its locality is higher than the class
map's, or equal (within 1e-9) with higher cluster accuracy; else the class map.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from scheduler.prediction.clusters import ActivationClusters
from scheduler.prediction.locality import hot_set_mask, locality, per_node_capacity
from scheduler.prediction.prefill_decode import evaluate_prediction
from scheduler.prediction.text_classifier import TextClassifier
from scheduler.prediction.text_cluster import TextClusterClassifier

#: Held-out pairs needed before the learned predictor may replace the class map.
MIN_DECISION_PAIRS = 10
#: Training pairs needed to fit a text predictor at all (and two clusters among them).
MIN_TRAIN_PAIRS = 4
#: Learning-curve sizes (training pairs); "all" is added.
CURVE_SIZES = (25, 50, 100, 200, 400, 800, 1600, 3200)
PREDICTORS = ("text_cluster", "class_map", "one_cluster")


def layer_shares(counts: np.ndarray) -> np.ndarray:
    """[..., L, E] counts -> per-layer shares (rows sum to 1; empty rows stay 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    sums = counts.sum(axis=-1, keepdims=True)
    return np.divide(counts, sums, out=np.zeros_like(counts), where=sums > 0)


def cluster_shares(clusters: ActivationClusters) -> np.ndarray:
    """[K, L, E] per-layer shares of each cluster's training counts."""
    return layer_shares(clusters.cluster_counts_)


class TextHistogramPredictor:
    """Prompt -> (cluster, per-layer expert shares [L, E]) from a fitted
    :class:`TextClusterClassifier`: the mixture of the clusters' shares weighted by
    ``p(cluster | text)``. ``shares`` [K, L, E] defaults to the clusters' own."""

    def __init__(self, text_cluster: TextClusterClassifier, shares: np.ndarray | None = None):
        self.text_cluster = text_cluster
        s = cluster_shares(text_cluster.clusters) if shares is None else np.asarray(shares)
        self.shares = s
        self._flat = s.reshape(len(s), -1)

    def predict(self, texts: Any) -> tuple[np.ndarray, np.ndarray]:
        """([n] cluster ids, [n, L, E] mixture shares)."""
        proba = self.text_cluster.predict_proba(texts)
        mix = (proba @ self._flat).reshape(len(proba), *self.shares.shape[1:])
        return proba.argmax(axis=1).astype(np.int64), mix

    def predict_one(self, text: str) -> tuple[int, np.ndarray]:
        """Fast path: (cluster id, [L, E] mixture shares)."""
        proba = self.text_cluster.predict_one_proba(text)
        mix = (proba @ self._flat).reshape(self.shares.shape[1:])
        return int(proba.argmax()), mix


def clusters_fingerprint(clusters: ActivationClusters) -> str:
    """A short sha256 of the clusters' centres and layers (which clusters a profile's
    ``cluster-<c>`` classes were made from)."""
    import hashlib

    h = hashlib.sha256(np.ascontiguousarray(clusters.centers_, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(clusters.layers_, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- scoring


def _figures(
    assign: np.ndarray,
    shares: np.ndarray,
    truth: np.ndarray,
    counts: np.ndarray,
    mask: np.ndarray,
    top_k: int,
) -> dict[str, Any]:
    s = evaluate_prediction(shares, counts, k=top_k)
    return {
        "accuracy": float(np.mean(assign == truth)),
        "pearson": s["pearson_mean"],
        "recall_at_k": s["recall_at_k_mean"],
        "locality": locality(mask, assign, counts),
    }


def class_map_fit(
    train_domains: np.ndarray, train_clusters: np.ndarray, train_shares: np.ndarray
) -> tuple[dict[str, int], dict[str, np.ndarray], int, np.ndarray]:
    """The class map learned from training pairs (module docstring): (domain -> cluster,
    domain -> shares, fallback cluster, fallback shares)."""
    largest = int(np.bincount(train_clusters).argmax())
    mean = train_shares.mean(axis=0)
    to_cluster, to_shares = {}, {}
    for d in np.unique(train_domains):
        rows = train_domains == d
        to_cluster[str(d)] = int(np.bincount(train_clusters[rows]).argmax())
        to_shares[str(d)] = train_shares[rows].mean(axis=0)
    return to_cluster, to_shares, largest, mean


def score_pairs(
    clusters: ActivationClusters,
    domain: TextClassifier,
    texts_train: np.ndarray,
    counts_train: np.ndarray,
    texts_test: np.ndarray,
    counts_test: np.ndarray,
    *,
    nodes: int,
    top_k: int,
    domains_train: np.ndarray | None = None,
    domains_test: np.ndarray | None = None,
) -> tuple[TextClusterClassifier | None, dict[str, Any]]:
    """Fit the learned predictor on the training pairs and score every predictor on the
    test pairs (module docstring). ``domains_*``: the domain classifier's predictions,
    when already computed. Returns (learned model or None, figures); with fewer than
    :data:`MIN_TRAIN_PAIRS` training pairs or one cluster among them, ``{"skipped": why}``."""
    per_node = per_node_capacity(counts_test.shape[2], nodes)
    truth_train = clusters.predict(counts_train)
    present = np.unique(truth_train)
    if len(texts_train) < MIN_TRAIN_PAIRS or len(present) < 2:
        return None, {
            "skipped": f"{len(texts_train)} training pairs in {len(present)} cluster(s); "
            f"need at least {MIN_TRAIN_PAIRS} pairs of at least two clusters"
        }
    if not len(texts_test):
        return None, {"skipped": "no held-out pairs"}
    start = time.perf_counter()
    text = TextClassifier(features=domain.features_)
    learned = TextClusterClassifier(clusters, text=text).fit(texts_train, counts_train)
    fit_s = time.perf_counter() - start
    truth = clusters.predict(counts_test)
    mask = hot_set_mask(clusters.cluster_counts_, per_node)
    out: dict[str, Any] = {"train_pairs": len(texts_train), "test_pairs": len(texts_test)}
    out["fit_seconds"] = fit_s

    hist = TextHistogramPredictor(learned)
    assign, mix = hist.predict(texts_test)
    out["text_cluster"] = _figures(assign, mix, truth, counts_test, mask, top_k)
    argmax = _figures(assign, hist.shares[assign], truth, counts_test, mask, top_k)
    out["text_cluster"]["pearson_argmax"] = argmax["pearson"]

    if domains_train is None:
        domains_train = domain.predict(texts_train)
    if domains_test is None:
        domains_test = domain.predict(texts_test)
    shares_train = layer_shares(counts_train)
    to_cluster, to_shares, largest, mean = class_map_fit(domains_train, truth_train, shares_train)
    cm_assign = np.array([to_cluster.get(str(d), largest) for d in domains_test], dtype=np.int64)
    cm_shares = np.stack([to_shares.get(str(d), mean) for d in domains_test])
    out["class_map"] = _figures(cm_assign, cm_shares, truth, counts_test, mask, top_k)
    out["class_map"]["map"] = {d: f"cluster-{c}" for d, c in sorted(to_cluster.items())}

    one_mask = hot_set_mask(counts_train.sum(axis=0)[None], per_node)
    zeros = np.zeros(len(texts_test), dtype=np.int64)
    one = _figures(
        zeros, np.repeat(mean[None], len(texts_test), 0), zeros, counts_test, one_mask, top_k
    )
    one["accuracy"] = float(np.mean(truth == largest))
    out["one_cluster"] = one
    out["true_cluster"] = {
        "accuracy": 1.0,
        "locality": locality(mask, truth, counts_test),
        "pearson": evaluate_prediction(hist.shares[truth], counts_test, k=top_k)["pearson_mean"],
    }
    return learned, out


def choose_text_predictor(held_out: dict[str, Any]) -> dict[str, Any]:
    """The rule of the module docstring: ``{"use": "text_cluster" | "class_map", "why"}``."""
    if "skipped" in held_out:
        return {"use": "class_map", "why": f"learned predictor not fitted: {held_out['skipped']}"}
    n = held_out["test_pairs"]
    if n < MIN_DECISION_PAIRS:
        return {
            "use": "class_map",
            "why": f"{n} held-out pairs; need {MIN_DECISION_PAIRS} to decide",
        }
    lt, lc = held_out["text_cluster"]["locality"], held_out["class_map"]["locality"]
    at, ac = held_out["text_cluster"]["accuracy"], held_out["class_map"]["accuracy"]
    figures = f"locality {lt:.3f} vs {lc:.3f}, accuracy {at:.3f} vs {ac:.3f} on {n} pairs"
    if lt > lc + 1e-9 or (abs(lt - lc) <= 1e-9 and at > ac):
        return {"use": "text_cluster", "why": f"beat the class map on held-out pairs: {figures}"}
    return {"use": "class_map", "why": f"did not beat the class map: {figures}"}


def score_with_curve(
    clusters: ActivationClusters,
    domain: TextClassifier,
    texts_train: np.ndarray,
    counts_train: np.ndarray,
    texts_test: np.ndarray,
    counts_test: np.ndarray,
    *,
    nodes: int,
    top_k: int,
    seeds: int = 3,
    sizes: tuple[int, ...] = CURVE_SIZES,
) -> tuple[TextClusterClassifier | None, dict[str, Any], list[dict[str, Any]]]:
    """:func:`score_pairs` on all the training pairs (the learned model and its figures),
    and the learning curve: the held-out figures of the predictors fitted on the first
    ``n`` training pairs (a random order per seed) for each ``n`` in ``sizes`` below the
    training size, and all (the first result, not fitted again). Each curve row:
    ``pairs``, ``seed`` and the figures of :func:`score_pairs` (or ``skipped``)."""
    n_train = len(texts_train)
    domains_train = domain.predict(texts_train) if n_train else np.array([], dtype=str)
    domains_test = domain.predict(texts_test) if len(texts_test) else np.array([], dtype=str)

    def score(rows: np.ndarray) -> tuple[TextClusterClassifier | None, dict[str, Any]]:
        return score_pairs(
            clusters,
            domain,
            texts_train[rows],
            counts_train[rows],
            texts_test,
            counts_test,
            nodes=nodes,
            top_k=top_k,
            domains_train=domains_train[rows],
            domains_test=domains_test,
        )

    learned, held = score(np.arange(n_train))
    rows = []
    for n in sorted({s for s in sizes if s < n_train} | {n_train}):
        for seed in range(seeds if n < n_train else 1):
            order = np.random.default_rng(seed).permutation(n_train)[:n]
            figures = held if n == n_train else score(order)[1]
            row: dict[str, Any] = {"pairs": n, "seed": seed}
            row.update({k: v for k, v in figures.items() if k not in ("train_pairs",)})
            if "class_map" in row:
                row["class_map"] = {k: v for k, v in row["class_map"].items() if k != "map"}
            rows.append(row)
    return learned, held, rows


def summarise_curve(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size: the mean over seeds of each predictor's figures (skipped rows dropped)."""
    out = []
    for n in sorted({r["pairs"] for r in rows}):
        mine = [r for r in rows if r["pairs"] == n and "skipped" not in r]
        entry: dict[str, Any] = {"pairs": n, "runs": len(mine)}
        if not mine:
            entry["skipped"] = next(r["skipped"] for r in rows if r["pairs"] == n)
        for name in PREDICTORS:
            if mine:
                entry[name] = {
                    k: _mean([r[name][k] for r in mine])
                    for k in ("accuracy", "pearson", "locality")
                }
        out.append(entry)
    return out


def _mean(values: list[Any]) -> float | None:
    v = [x for x in values if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else None
