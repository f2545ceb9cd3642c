"""Text-to-cluster classifier: a request's activation cluster guessed from its prompt.

Trained from (prompt text, routed experts) pairs -- the pairs the server collects from
finished requests (SGLang returns ``routed_experts`` with each one). The routed counts
give each pair its cluster through fitted :class:`ActivationClusters`; a
:class:`TextClassifier` learns text -> cluster. Clusters stay fixed after training
(they define the placement); the text side keeps learning:

* ``fit(texts, counts)`` trains from scratch;
* ``partial_fit(texts, counts)`` takes SGD steps on newly finished requests, and may
  start cold (before any ``fit``) when given fitted text features, e.g. the domain
  classifier's;
* every labelled batch also feeds a :class:`ClassMixDrift` over the finished requests'
  true clusters; ``drift_result_`` is the last test (``drifted`` = re-placement due).
"""

from __future__ import annotations

import numpy as np

from scheduler.prediction.clusters import ActivationClusters
from scheduler.prediction.drift import ClassMixDrift, DriftResult
from scheduler.prediction.text_classifier import TextClassifier, Texts


class TextClusterClassifier:
    """Prompt text -> activation cluster id (see the module docstring).

    Parameters: ``clusters`` (fitted), ``text`` (the text model to train; default a
    new :class:`TextClassifier`), ``drift`` (default a new :class:`ClassMixDrift`).
    Learned: ``text_`` and ``drift_`` (fitted), ``drift_result_`` (last test or None).
    """

    def __init__(
        self,
        clusters: ActivationClusters,
        *,
        text: TextClassifier | None = None,
        drift: ClassMixDrift | None = None,
    ) -> None:
        self.clusters = clusters
        self.text = text
        self.drift = drift

    def _labels(self, texts: Texts, counts: np.ndarray) -> np.ndarray:
        counts = np.asarray(counts)
        if len(counts) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(counts)} routing records")
        return self.clusters.predict(counts).astype(str)

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in range(self.clusters.n_clusters)]

    def fit(self, texts: Texts, counts: np.ndarray) -> TextClusterClassifier:
        """Train the text model on the pairs' clusters; the drift reference is their mix."""
        labels = self._labels(texts, counts)
        self.text_ = (self.text or TextClassifier()).fit(texts, labels)
        self.drift_ = (self.drift or ClassMixDrift()).fit(labels, classes=self.classes)
        self.drift_result_: DriftResult | None = None
        return self

    def partial_fit(self, texts: Texts, counts: np.ndarray) -> TextClusterClassifier:
        """Learn from finished requests; updates the drift window with their clusters."""
        labels = self._labels(texts, counts)
        if not hasattr(self, "text_"):
            self.text_ = self.text or TextClassifier()
            self.drift_ = self.drift or ClassMixDrift()
            if not hasattr(self.drift_, "reference_"):
                # Cold start: the first batch's mix is the reference.
                self.drift_.fit(labels, classes=self.classes)
            self.drift_result_ = None
        self.text_.partial_fit(texts, labels, classes=self.classes)
        self.drift_result_ = self.drift_.update(labels)
        return self

    def predict(self, texts: Texts) -> np.ndarray:
        """[n] int64 cluster ids."""
        return self.text_.predict(texts).astype(np.int64)

    def predict_proba(self, texts: Texts) -> np.ndarray:
        """[n, K] probabilities over clusters 0..K-1 (columns in cluster order)."""
        proba = self.text_.predict_proba(texts)
        out = np.zeros((len(texts), self.clusters.n_clusters))
        out[:, self.text_.classes_.astype(np.int64)] = proba
        return out

    def predict_one(self, text: str) -> tuple[int, float]:
        """Fast path for one request: (cluster id, its probability)."""
        label, p = self.text_.predict_one(text)
        return int(label), p

    def predict_one_proba(self, text: str) -> np.ndarray:
        """Fast path for one request: [K] probabilities over clusters 0..K-1."""
        proba = self.text_.predict_one_proba(text)
        out = np.zeros(self.clusters.n_clusters)
        out[self.text_.classes_.astype(np.int64)] = proba
        return out
