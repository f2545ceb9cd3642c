import numpy as np
import pytest

from scheduler.prediction.clusters import ActivationClusters
from scheduler.prediction.drift import ClassMixDrift
from scheduler.prediction.text_classifier import TextClassifier
from scheduler.prediction.text_cluster import TextClusterClassifier
from scheduler.prediction.text_features import HashedTfidf
from tests.prediction_data import clustered_counts, prompts


def draw(rng, mix, n):
    return rng.choice(["a", "b", "c"], size=n, p=mix).tolist()


def test_same_mix_passes_and_shifted_mix_drifts():
    rng = np.random.default_rng(0)
    drift = ClassMixDrift(window=400).fit(draw(rng, [0.5, 0.3, 0.2], 5000))
    false_alarms = sum(drift.test(draw(rng, [0.5, 0.3, 0.2], 400)).drifted for _ in range(50))
    assert false_alarms <= 1
    shifted = drift.test(draw(rng, [0.2, 0.3, 0.5], 400))
    assert shifted.drifted and shifted.psi > 0.1 and shifted.p_value < 1e-3
    assert shifted.n == 400 and sum(shifted.counts) == 400


def test_rolling_window_and_unseen_class():
    drift = ClassMixDrift(window=100).fit(["a"] * 50 + ["b"] * 50, classes=["a", "b", "c"])
    assert not drift.update(["a", "b"] * 50).drifted
    result = drift.update(["c"] * 100)  # the window now holds only the new requests
    assert result.n == 100 and result.counts == [0, 0, 100] and result.drifted
    with pytest.raises(ValueError, match="not among"):
        drift.update(["zzz"])
    back = ClassMixDrift.from_state(*drift.get_state())
    assert np.allclose(back.reference_, drift.reference_)
    assert back.test(["c"] * 100).drifted


def test_text_to_cluster_fit_partial_fit_and_drift(tiny_model):
    counts, group = clustered_counts(tiny_model, 30, groups=2, seed=3)
    texts = np.array(prompts("code", 30) + prompts("math", 30), dtype=object)
    clusters = ActivationClusters(2).fit(counts)
    truth = clusters.predict(counts)
    features = HashedTfidf(word_bits=12, char_bits=14)
    model = TextClusterClassifier(
        clusters, text=TextClassifier(features=features), drift=ClassMixDrift(window=40)
    )
    model.fit(texts[::2], counts[::2])
    assert np.mean(model.predict(texts[1::2]) == truth[1::2]) > 0.9
    proba = model.predict_proba(texts[:3])
    assert proba.shape == (3, 2) and np.allclose(proba.sum(axis=1), 1)
    label, p = model.predict_one(texts[0])
    assert label == model.predict(texts[:1])[0] and 0.5 < p <= 1
    # finished requests keep coming: only one cluster now -> drift
    only = np.flatnonzero(truth == truth[0])
    model.partial_fit(texts[only], counts[only])
    assert model.text_.n_partial_samples_ == len(only)
    assert model.drift_result_ is not None and model.drift_result_.drifted


def test_text_to_cluster_cold_start_from_shared_features(tiny_model):
    counts, _ = clustered_counts(tiny_model, 30, groups=2, seed=4)
    texts = np.array(prompts("chat", 30) + prompts("general", 30), dtype=object)
    features = HashedTfidf(word_bits=12, char_bits=14).fit(texts)
    clusters = ActivationClusters(2).fit(counts)
    truth = clusters.predict(counts)
    model = TextClusterClassifier(clusters, text=TextClassifier(features=features))
    order = np.random.default_rng(0).permutation(60)
    for start in range(0, 40, 10):
        rows = order[start : start + 10]
        model.partial_fit(texts[rows], counts[rows])
    held = order[40:]
    assert np.mean(model.predict(texts[held]) == truth[held]) > 0.9
    assert model.drift_result_ is not None and not model.drift_result_.drifted
