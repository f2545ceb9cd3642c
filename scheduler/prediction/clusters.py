"""Activation clusters: k-means over per-request expert-activation vectors.

Paper B (§4.1): each request's decode expert counts, per layer normalised, flattened
and L2-normalised (:func:`scheduler.profile.request_activation_vectors`), clustered with
k-means; a cluster's summed counts (``cluster_counts_``, paper B's ``U``) are what the
placement solve gets for that request class. ``features`` picks the vector:

* ``"share"``: paper B's vector, exactly (computed by the profile helper).
* ``"share-idf"``: the shares weighted by each expert's inverse document frequency
  over training requests, ``ln((1 + n) / (1 + df)) + 1`` per (layer, expert), as in
  ELDR's count x IDF signature; experts every request uses count for less.
* ``"top-mask"``: 1 for the request's ``top_m`` most used experts of each layer, else
  0 (what decides locality when a node holds ``top_m`` experts per layer).

``layers`` restricts the vector to some MoE layer indices (default: all). Choosing K and
features by measured placement benefit is :mod:`scheduler.prediction.cluster_selection`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scheduler.prediction.locality import top_mask
from scheduler.profile import request_activation_vectors
from scheduler.traces.store import TraceBatch

FEATURES = ("share", "share-idf", "top-mask")


def paper_b_vectors(counts: np.ndarray) -> np.ndarray:
    """Paper B's request activation vectors of counts [n, L, E] -> [n, L * E] float32.

    Wraps the counts in a one-phase :class:`TraceBatch` so the profile's own helper
    computes them (one definition of the vector in the code base).
    """
    n = len(counts)
    batch = TraceBatch(
        request_ids=[""] * n,
        labels=[None] * n,
        prompts=[None] * n,
        counts={"mixed": counts},
        tokens={"mixed": np.zeros(n, dtype=np.int64)},
        present={"mixed": np.ones(n, dtype=bool)},
        token_ids={},
        gate_weights={},
        dp_rank=np.full(n, -1),
        arrival_s=np.full(n, np.nan),
        finish_s=np.full(n, np.nan),
    )
    return request_activation_vectors(batch)


def _l2_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0).astype(np.float32)


class ActivationClusters:
    """K-means request clusters over activation vectors (see the module docstring).

    Learned: ``layers_`` [L'] MoE layer indices used, ``idf_`` [L', E] (``share-idf``
    only, else None), ``centers_`` [K, D], ``labels_`` [n] (training assignment),
    ``cluster_counts_`` [K, L, E] summed training counts per cluster over all layers,
    ``weights_`` [K] share of training activations, ``inertia_``.
    """

    def __init__(
        self,
        n_clusters: int = 4,
        *,
        features: str = "share",
        layers: tuple[int, ...] | None = None,
        top_m: int | None = None,
        n_init: int = 4,
        random_state: int = 0,
    ) -> None:
        self.n_clusters = n_clusters
        self.features = features
        self.layers = layers
        self.top_m = top_m
        self.n_init = n_init
        self.random_state = random_state

    def get_params(self) -> dict[str, Any]:
        return {
            "n_clusters": self.n_clusters,
            "features": self.features,
            "layers": None if self.layers is None else list(self.layers),
            "top_m": self.top_m,
            "n_init": self.n_init,
            "random_state": self.random_state,
        }

    def _check(self, counts: np.ndarray) -> None:
        if counts.ndim != 3:
            raise ValueError(f"counts must be [requests, layers, experts], got {counts.shape}")
        if self.features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, got {self.features!r}")
        if self.features == "top-mask" and not (self.top_m and 0 < self.top_m <= counts.shape[2]):
            raise ValueError(f"features 'top-mask' needs top_m in [1, experts], got {self.top_m}")
        if self.layers is not None and (
            not self.layers or min(self.layers) < 0 or max(self.layers) >= counts.shape[1]
        ):
            raise ValueError(f"layers must be MoE layer indices in [0, {counts.shape[1]})")

    def transform(self, counts: np.ndarray) -> np.ndarray:
        """Activation vectors of counts [n, L, E] -> [n, D] float32 (L2-normalised)."""
        self._check(counts)
        sel = np.asarray(counts, dtype=np.float64)[:, self.layers_]
        if self.features == "share":
            return paper_b_vectors(sel)
        if self.features == "top-mask":
            assert self.top_m is not None
            x = top_mask(sel, self.top_m) & (sel > 0)
            return _l2_rows(x.reshape(len(sel), -1).astype(np.float64))
        sums = sel.sum(axis=2, keepdims=True)
        shares = np.divide(sel, sums, out=np.zeros_like(sel), where=sums > 0)
        assert self.idf_ is not None
        return _l2_rows((shares * self.idf_).reshape(len(sel), -1))

    def fit(self, counts: np.ndarray) -> ActivationClusters:
        from sklearn.cluster import KMeans

        counts = np.asarray(counts, dtype=np.float64)
        self._check(counts)
        n = len(counts)
        if not 1 <= self.n_clusters <= n:
            raise ValueError(f"n_clusters must be in [1, {n}] (requests), got {self.n_clusters}")
        layers = range(counts.shape[1]) if self.layers is None else self.layers
        self.layers_ = np.array(sorted(set(layers)), dtype=np.int64)
        self.idf_: np.ndarray | None = None
        if self.features == "share-idf":
            df = (counts[:, self.layers_] > 0).sum(axis=0)
            self.idf_ = np.log((1.0 + n) / (1.0 + df)) + 1.0
        x = self.transform(counts)
        # Fewer distinct activation vectors than clusters (e.g. top-k equal to the expert
        # count: every request's vector is the same): k-means on the distinct ones, and
        # the extra clusters stay empty -- copies of centre 0 placed after it, so the
        # nearest-centre rule of predict() never picks them.
        fit_k = min(self.n_clusters, len(np.unique(x, axis=0)))
        model = KMeans(n_clusters=fit_k, n_init=self.n_init, random_state=self.random_state).fit(x)
        centers = model.cluster_centers_
        if fit_k < self.n_clusters:
            centers = np.vstack([centers, np.repeat(centers[:1], self.n_clusters - fit_k, 0)])
        self.centers_ = centers.astype(np.float32)
        self.labels_ = model.labels_.astype(np.int64)
        self.inertia_ = float(model.inertia_)
        self._set_cluster_counts(counts, self.labels_)
        return self

    def _set_cluster_counts(self, counts: np.ndarray, labels: np.ndarray) -> None:
        k = self.n_clusters
        self.cluster_counts_ = np.stack([counts[labels == c].sum(axis=0) for c in range(k)])
        total = self.cluster_counts_.sum()
        sizes = self.cluster_counts_.sum(axis=(1, 2))
        self.weights_ = sizes / total if total else np.full(k, 1 / k)

    def predict(self, counts: np.ndarray) -> np.ndarray:
        """Nearest centre of each request's vector: [n] int64 cluster ids."""
        x = self.transform(np.asarray(counts, dtype=np.float64))
        d = (x * x).sum(axis=1)[:, None] - 2 * x @ self.centers_.T
        d += (self.centers_ * self.centers_).sum(axis=1)[None, :]
        return d.argmin(axis=1).astype(np.int64)

    # ------------------------------------------------------------------ state

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        params = {**self.get_params(), "inertia": self.inertia_}
        arrays = {
            "layers": self.layers_,
            "centers": self.centers_,
            "cluster_counts": self.cluster_counts_,
            "weights": self.weights_,
        }
        if self.idf_ is not None:
            arrays["idf"] = self.idf_
        return params, arrays

    @classmethod
    def from_state(
        cls, params: dict[str, Any], arrays: dict[str, np.ndarray]
    ) -> ActivationClusters:
        layers = params["layers"]
        self = cls(
            int(params["n_clusters"]),
            features=str(params["features"]),
            layers=None if layers is None else tuple(int(v) for v in layers),
            top_m=None if params["top_m"] is None else int(params["top_m"]),
            n_init=int(params["n_init"]),
            random_state=int(params["random_state"]),
        )
        if self.features not in FEATURES:
            raise ValueError(f"unknown cluster features {self.features!r}")
        self.layers_ = arrays["layers"].astype(np.int64)
        self.centers_ = arrays["centers"].astype(np.float32)
        self.cluster_counts_ = arrays["cluster_counts"].astype(np.float64)
        self.weights_ = arrays["weights"].astype(np.float64)
        self.idf_ = arrays["idf"].astype(np.float64) if "idf" in arrays else None
        self.inertia_ = float(params["inertia"])
        k, _, experts = self.cluster_counts_.shape
        width = len(self.layers_) * experts
        if k != self.n_clusters or self.centers_.shape != (k, width):
            raise ValueError("cluster arrays do not match n_clusters / layers")
        if (self.features == "share-idf") != (self.idf_ is not None):
            raise ValueError("idf array present for the wrong features")
        return self
