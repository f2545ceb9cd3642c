"""A softmax linear model over hashed TF-IDF text features, with incremental updates.

``fit`` learns the features' idf and a multinomial logistic regression (scikit-learn,
L-BFGS; the default ``C = 30`` was chosen with the features' defaults on a validation
split of the training prompts). ``partial_fit`` then takes plain stochastic-gradient
steps on new labelled texts from the current weights (softmax cross-entropy; per-sample
steps of size ``learning_rate`` summed over each mini-batch; L2 penalty ``alpha`` on the
rows a mini-batch touches); the idf and the set of known buckets stay as ``fit`` left
them, so vocabulary that appears only later is ignored until the next ``fit``. The
default step (0.5, 2 epochs per batch) was chosen on a validation split of the training
prompts. The weights are kept dense over the hashed feature space so one request is
scored by a gather and a small matrix product (:meth:`TextClassifier.predict_one`): the
request's distinct buckets (one in-place sort) fetch their weights and idf together from
one [n_features, 8] float32 table (four classes; built on first use, 42 MB at the default
sizes), without building a sparse matrix.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from scheduler.prediction.text_features import HashedTfidf, sublinear_tf

#: Texts and labels may be sequences or 1-D numpy arrays.
Texts = Sequence[str] | np.ndarray
Labels = Sequence[Any] | np.ndarray


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax of [n, classes] (or [classes]) scores."""
    z = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class TextClassifier:
    """Text -> class probabilities (see the module docstring).

    Parameters: ``features`` (an unfitted :class:`HashedTfidf` to fit, or a fitted one to
    reuse as is; default: a new one with default parameters), ``C`` and ``max_iter`` of
    the logistic regression, ``class_weight`` (None or "balanced"), and for
    ``partial_fit``: ``learning_rate``, ``alpha``, ``epochs``, ``batch_size``,
    ``random_state``.

    Learned: ``features_``, ``classes_`` [C] str, ``weights_`` [n_features, C] float32,
    ``intercept_`` [C] float32, ``n_fit_samples_``, ``n_partial_samples_``, ``converged_``.
    """

    def __init__(
        self,
        *,
        features: HashedTfidf | None = None,
        C: float = 30.0,
        max_iter: int = 300,
        class_weight: str | None = None,
        learning_rate: float = 0.5,
        alpha: float = 1e-6,
        epochs: int = 2,
        batch_size: int = 64,
        random_state: int = 0,
    ) -> None:
        self.features = features
        self.C = C
        self.max_iter = max_iter
        self.class_weight = class_weight
        self.learning_rate = learning_rate
        self.alpha = alpha
        self.epochs = epochs
        self.batch_size = batch_size
        self.random_state = random_state
        self._table: np.ndarray | None = None

    def get_params(self) -> dict[str, Any]:
        return {
            "C": self.C,
            "max_iter": self.max_iter,
            "class_weight": self.class_weight,
            "learning_rate": self.learning_rate,
            "alpha": self.alpha,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "random_state": self.random_state,
        }

    # ------------------------------------------------------------------ fitting

    def fit(self, texts: Texts, labels: Labels) -> TextClassifier:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        y = np.asarray([str(v) for v in labels])
        if len(y) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(y)} labels")
        classes = np.unique(y)
        if len(classes) < 2:
            raise ValueError(f"need at least two classes to fit, got {classes.tolist()}")
        features = self.features if self.features is not None else HashedTfidf()
        if hasattr(features, "idf_"):
            x = features.transform(texts)
        else:
            x = features.fit_transform(texts)
        active = np.flatnonzero(features.idf_)
        model = LogisticRegression(C=self.C, max_iter=self.max_iter, class_weight=self.class_weight)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(x[:, active], y)
        self.converged_ = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        self.features_ = features
        self.classes_ = model.classes_.astype(str)
        coef = model.coef_.T
        if len(self.classes_) == 2:  # binary LR keeps one row: expand to two softmax rows
            coef = np.hstack([-coef / 2, coef / 2])
            intercept = np.array([-model.intercept_[0] / 2, model.intercept_[0] / 2])
        else:
            intercept = model.intercept_
        self.weights_ = np.zeros((features.n_features, len(self.classes_)), dtype=np.float32)
        self.weights_[active] = coef
        self.intercept_ = intercept.astype(np.float32)
        self.n_fit_samples_ = len(y)
        self.n_partial_samples_ = 0
        self._table = None
        return self

    def partial_fit(
        self,
        texts: Texts,
        labels: Labels,
        classes: Labels | None = None,
    ) -> TextClassifier:
        """Update the weights with SGD steps on a batch of labelled texts.

        Before any ``fit``, ``features`` must be a fitted :class:`HashedTfidf` and
        ``classes`` must list every class; the weights then start at zero.
        """
        y = np.asarray([str(v) for v in labels])
        if len(y) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(y)} labels")
        if not hasattr(self, "weights_"):
            self._start_cold(classes)
        elif classes is not None:
            self._add_classes(classes)
        unknown = sorted(set(y.tolist()) - set(self.classes_.tolist()))
        if unknown:
            raise ValueError(f"labels {unknown} are not among the classes {self.classes_}")
        if not len(y):
            return self
        x = self.features_.transform(texts)
        target = (y[:, None] == self.classes_[None, :]).astype(np.float32)
        rng = np.random.default_rng(self.random_state + self.n_partial_samples_)
        for _ in range(self.epochs):
            order = rng.permutation(len(y))
            for start in range(0, len(y), self.batch_size):
                rows = order[start : start + self.batch_size]
                self._sgd_step(x[rows], target[rows])
        self.n_partial_samples_ += len(y)
        self._table = None
        return self

    def _start_cold(self, classes: Labels | None) -> None:
        features = self.features
        if features is None or not hasattr(features, "idf_"):
            raise ValueError("partial_fit before fit needs fitted features (a HashedTfidf)")
        if classes is None or len(set(classes)) < 2:
            raise ValueError("partial_fit before fit needs classes= listing every class")
        self.features_ = features
        self.classes_ = np.unique(np.asarray([str(c) for c in classes]))
        self.weights_ = np.zeros((features.n_features, len(self.classes_)), dtype=np.float32)
        self.intercept_ = np.zeros(len(self.classes_), dtype=np.float32)
        self.n_fit_samples_ = 0
        self.n_partial_samples_ = 0
        self.converged_ = True
        self._table = None

    def _add_classes(self, classes: Labels) -> None:
        """Widen the model to classes it has not seen (new columns start at zero)."""
        merged = np.unique(np.concatenate([self.classes_, [str(c) for c in classes]]))
        if len(merged) == len(self.classes_):
            return
        where = np.searchsorted(merged, self.classes_)
        weights = np.zeros((self.weights_.shape[0], len(merged)), dtype=np.float32)
        weights[:, where] = self.weights_
        intercept = np.zeros(len(merged), dtype=np.float32)
        intercept[where] = self.intercept_
        self.classes_, self.weights_, self.intercept_ = merged, weights, intercept
        self._table = None

    def _sgd_step(self, x: sp.csr_matrix, target: np.ndarray) -> None:
        cols, inverse = np.unique(x.indices, return_inverse=True)
        local = sp.csr_matrix((x.data, inverse, x.indptr), shape=(x.shape[0], len(cols)))
        w = self.weights_[cols]
        error = softmax(local @ w + self.intercept_) - target  # d loss / d scores
        # Per-sample SGD steps summed over the mini-batch (a rare bucket gets the step its
        # own samples call for, not one diluted by the batch size); the intercept, which
        # every sample touches, takes the mean.
        grad = np.asarray(local.T @ error) + self.alpha * w
        self.weights_[cols] = w - self.learning_rate * grad
        self.intercept_ -= self.learning_rate * error.mean(axis=0)

    # ------------------------------------------------------------------ prediction

    def decision_function(self, texts: Texts) -> np.ndarray:
        """[n, C] linear scores."""
        return np.asarray(self.features_.transform(texts) @ self.weights_) + self.intercept_

    def predict_proba(self, texts: Texts) -> np.ndarray:
        """[n, C] class probabilities, columns in ``classes_`` order."""
        return softmax(self.decision_function(texts))

    def predict(self, texts: Texts) -> np.ndarray:
        return self.classes_[self.decision_function(texts).argmax(axis=1)]

    def _score_table(self) -> np.ndarray:
        """[n_features, width] float32: the weights (``C`` columns), then the features'
        idf, zero-padded to a multiple of 4 columns, so that one gather fetches all a
        bucket needs for scoring. Built on first use and dropped whenever the weights
        change (``fit``, ``partial_fit``, new classes, ``from_state``)."""
        table = getattr(self, "_table", None)
        if table is None:
            n_classes = len(self.classes_)
            width = -(-(n_classes + 1) // 4) * 4
            table = np.zeros((self.weights_.shape[0], width), dtype=np.float32)
            table[:, :n_classes] = self.weights_
            table[:, n_classes] = self.features_.idf_
            self._table = table
        return table

    def _scores_one(self, text: str) -> np.ndarray:
        """[C] float32 linear scores of one text: the same sums as
        :meth:`decision_function`, from one gather of :meth:`_score_table` rows."""
        buckets, counts, n_word = self.features_.bucket_counts(text)
        table = self._score_table()
        n_classes = len(self.classes_)
        rows = np.take(table, buckets, axis=0)
        values = sublinear_tf(counts) * rows[:, n_classes]  # tf x idf
        for block in (values[:n_word], values[n_word:]):  # views: normalised in place
            norm = float(block @ block)
            if norm > 0:
                block /= np.float32(math.sqrt(norm))
        return (values @ rows)[:n_classes] + self.intercept_

    def predict_one(self, text: str) -> tuple[str, float]:
        """Fast path for a single request: (class, its probability)."""
        scores = self._scores_one(text).tolist()
        best = max(range(len(scores)), key=scores.__getitem__)
        top = scores[best]  # softmax over a handful of classes, in plain floats
        return str(self.classes_[best]), 1.0 / sum(math.exp(s - top) for s in scores)

    def predict_one_proba(self, text: str) -> np.ndarray:
        """Fast path for a single request: [C] probabilities in ``classes_`` order."""
        scores = self._scores_one(text)
        e = np.exp(scores - scores.max())
        return np.asarray(e / e.sum(), dtype=np.float64)

    # ------------------------------------------------------------------ state

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able parameters, arrays) for the bundle; zero weight rows are not stored."""
        rows = np.flatnonzero(np.any(self.weights_ != 0, axis=1)).astype(np.int32)
        fparams, farrays = self.features_.get_state()
        params = {
            **self.get_params(),
            "classes": self.classes_.tolist(),
            "features": fparams,
            "n_fit_samples": int(self.n_fit_samples_),
            "n_partial_samples": int(self.n_partial_samples_),
            "converged": bool(self.converged_),
        }
        arrays = {
            "weight_index": rows,
            "weight_value": self.weights_[rows],
            "intercept": self.intercept_,
            **{f"features.{k}": v for k, v in farrays.items()},
        }
        return params, arrays

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> TextClassifier:
        features = HashedTfidf.from_state(
            params["features"],
            {
                k.removeprefix("features."): v
                for k, v in arrays.items()
                if k.startswith("features.")
            },
        )
        keys = ("C", "max_iter", "class_weight", "learning_rate", "alpha", "epochs", "batch_size")
        self = cls(
            features=features,
            random_state=int(params["random_state"]),
            **{k: params[k] for k in keys},
        )
        classes = np.asarray([str(c) for c in params["classes"]])
        rows, values = arrays["weight_index"], arrays["weight_value"]
        if values.shape != (len(rows), len(classes)) or arrays["intercept"].shape != (
            len(classes),
        ):
            raise ValueError("weight arrays do not match the number of classes")
        if len(rows) and (rows.min() < 0 or rows.max() >= features.n_features):
            raise ValueError("weight index out of range for the feature space")
        self.features_ = features
        self.classes_ = classes
        self.weights_ = np.zeros((features.n_features, len(classes)), dtype=np.float32)
        self.weights_[rows] = values
        self.intercept_ = arrays["intercept"].astype(np.float32)
        self.n_fit_samples_ = int(params["n_fit_samples"])
        self.n_partial_samples_ = int(params["n_partial_samples"])
        self.converged_ = bool(params["converged"])
        self._table = None
        self._score_table()  # built now, where bundles load (off the serving loop)
        return self
