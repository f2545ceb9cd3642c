"""Predictors: what a request will do to the experts, guessed before or early in it.

* :mod:`~scheduler.prediction.text_features` / :mod:`~scheduler.prediction.text_classifier`
  -- hashed TF-IDF word + char n-grams and a softmax linear model: the request domain
  classifier, and the text-to-cluster classifier's text side (with ``partial_fit``).
* :mod:`~scheduler.prediction.clusters` -- activation clusters (paper B's k-means over
  L2-normalised request activation vectors, and ours: K and features chosen by a
  measured placement-benefit proxy, :mod:`~scheduler.prediction.locality`).
* :mod:`~scheduler.prediction.text_cluster` -- text-to-cluster classifier trained from
  (prompt, routed experts) pairs, with incremental updates and class-mix drift
  detection (:mod:`~scheduler.prediction.drift`).
* :mod:`~scheduler.prediction.prefill_decode` -- decode-expert prediction from a
  request's prefill routing (own-histogram baseline and per-layer ridge).
* :mod:`~scheduler.prediction.bundle` -- the versioned, checksummed model bundle
  (numpy arrays + JSON, never pickle).
* :mod:`~scheduler.prediction.training` -- fitting all of them with held-out scores
  (what ``moe-scheduler fit`` runs); :mod:`~scheduler.prediction.evaluation` (scores,
  latency) and :mod:`~scheduler.prediction.profiles` (cluster workload profiles).

Pure algorithmic core: arrays in, arrays out. No network code lives here and nothing
reads the environment; file I/O is limited to the bundle and the dataset readers in
:mod:`~scheduler.prediction.datasets`. The CLI layer is :mod:`~scheduler.prediction.cli`.
"""
