"""Held-out predictions for the routing policies (what they see instead of oracles).

Fitted on training requests (their prefill expert counts, class label and decode expert
counts) and applied to other requests' prefill counts only:

* **class** (for ``class_affinity``): the nearest class centroid, by cosine similarity
  of per-layer expert shares flattened over layers (paper B's activation vector), the
  centroids being the training requests' mean vectors per class;
* **decode histogram** (for ``locality_band`` / ``locality_window``):
  ``"ridge"`` -- per-layer ridge regression from prefill to decode shares
  (:class:`~scheduler.prediction.prefill_decode.PrefillDecodePredictor`);
  ``"class"`` -- the predicted class's mean training decode shares (one shared array per
  class, cheap for very many requests); either times the predicted (token, expert)
  pairs, ``decode tokens x top_k``.

The request's own decode routing is never used. Pure numpy (+ scikit-learn for ridge).
"""

from __future__ import annotations

import numpy as np

from scheduler.prediction.prefill_decode import PrefillDecodePredictor, layer_shares

HISTOGRAM_METHODS = ("ridge", "class")


def activation_vectors(counts: np.ndarray) -> np.ndarray:
    """[n, layers, experts] counts -> [n, layers * experts] L2-normalised per-layer shares."""
    shares = layer_shares(counts).reshape(len(counts), -1)
    norms = np.linalg.norm(shares, axis=1, keepdims=True)
    return np.divide(shares, norms, out=np.zeros_like(shares), where=norms > 0)


class HeldOutPredictor:
    """Class and decode-histogram predictions from prefill counts (module docstring)."""

    def __init__(self, histogram: str = "ridge") -> None:
        if histogram not in HISTOGRAM_METHODS:
            raise ValueError(f"histogram must be one of {HISTOGRAM_METHODS}, got {histogram!r}")
        self.histogram = histogram

    def fit(self, prefill: np.ndarray, labels: list[str], decode: np.ndarray) -> HeldOutPredictor:
        """``prefill`` / ``decode [n, layers, experts]`` counts of training requests."""
        if len(labels) != len(prefill) or prefill.shape != decode.shape:
            raise ValueError("prefill, labels and decode must describe the same requests")
        self.classes_ = sorted(set(labels))
        vectors = activation_vectors(prefill)
        label_index = np.array([self.classes_.index(c) for c in labels])
        centroids = np.stack(
            [vectors[label_index == i].mean(axis=0) for i in range(len(self.classes_))]
        )
        self.centroids_ = activation_vectors(
            centroids.reshape(len(self.classes_), *prefill.shape[1:])
        )
        shares = layer_shares(decode)
        self.class_shares_ = {
            c: shares[label_index == i].mean(axis=0) for i, c in enumerate(self.classes_)
        }
        if self.histogram == "ridge":
            self.ridge_ = PrefillDecodePredictor("ridge").fit(prefill, decode)
        return self

    def predict_classes(self, prefill: np.ndarray) -> list[str]:
        """The nearest centroid's class of each request."""
        scores = activation_vectors(prefill) @ self.centroids_.T
        return [self.classes_[i] for i in np.argmax(scores, axis=1)]

    def predict_histograms(
        self, prefill: np.ndarray, pairs: np.ndarray, classes: list[str] | None = None
    ) -> list[np.ndarray]:
        """Predicted decode (token, expert) pair counts ``[layers, experts]`` per request,
        scaled to ``pairs [n]`` pairs per layer. With ``"class"`` and ``pairs`` all equal,
        requests of one class share one array object."""
        if self.histogram == "ridge":
            shares = self.ridge_.predict(prefill)
            return list(shares * np.asarray(pairs, dtype=np.float64)[:, None, None])
        classes = classes if classes is not None else self.predict_classes(prefill)
        cache: dict[tuple[str, float], np.ndarray] = {}
        out = []
        for c, p in zip(classes, np.asarray(pairs, dtype=np.float64).tolist(), strict=True):
            key = (c, p)
            if key not in cache:
                cache[key] = self.class_shares_[c] * p
            out.append(cache[key])
        return out
