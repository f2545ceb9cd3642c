import numpy as np
import pytest

from scheduler.prediction.text_classifier import TextClassifier, softmax
from scheduler.prediction.text_features import HashedTfidf
from tests.prediction_data import labelled_prompts, prompts


def small_features(**kw):
    return HashedTfidf(word_bits=12, char_bits=14, **kw)


def test_features_are_deterministic_normalised_and_match_batch():
    texts, _ = labelled_prompts(10)
    f = small_features(min_df=1)
    x = f.fit_transform(texts)
    assert x.shape == (len(texts), f.n_features)
    again = small_features(min_df=1).fit(texts)
    idx, val = again.transform_one(texts[3])
    row = x[3].toarray().ravel()
    assert np.array_equal(np.flatnonzero(row), idx)
    assert np.allclose(row[idx], val)
    # word block and char block are each L2-normalised
    word = idx < (1 << f.word_bits)
    assert np.isclose(np.linalg.norm(val[word]), 1) and np.isclose(np.linalg.norm(val[~word]), 1)


def test_features_ignore_case_whitespace_and_truncate():
    f = small_features(min_df=1).fit(["hello world", "other words here"])
    a = f.transform_one("Hello \n  World")
    b = f.transform_one("hello world")
    assert np.array_equal(a[0], b[0]) and np.allclose(a[1], b[1])
    f = small_features(min_df=1, max_chars=12).fit(["hello world", "other words here"])
    long_a = f.transform_one("hello world and more text")
    long_b = f.transform_one("hello world and different")
    assert np.array_equal(long_a[0], long_b[0])  # only the first 12 characters count


def test_min_df_drops_rare_buckets_and_empty_text_is_safe():
    f = small_features(min_df=2).fit(["alpha beta", "alpha gamma", "zzzzqqqq"])
    idx, _ = f.transform_one("zzzzqqqq")
    assert len(idx) == 0  # seen in one document only
    assert len(f.transform_one("")[0]) == 0
    with pytest.raises(ValueError, match="char_ngrams"):
        HashedTfidf(char_ngrams=(3, 2)).fit(["x"])


def test_classifier_fit_predict_and_fast_path_agree():
    texts, labels = labelled_prompts(30)
    clf = TextClassifier(features=small_features()).fit(texts, labels)
    assert clf.converged_ and clf.classes_.tolist() == sorted(set(labels))
    test, truth = labelled_prompts(10, seed=7)
    assert np.mean(clf.predict(test) == np.array(truth)) > 0.95
    proba = clf.predict_proba(test[:5])
    assert np.allclose(proba.sum(axis=1), 1)
    for text, row in zip(test[:5], proba, strict=True):
        label, p = clf.predict_one(text)
        assert label == clf.classes_[row.argmax()] and p == pytest.approx(row.max(), rel=1e-5)


def test_binary_fit_gives_two_softmax_columns():
    texts = prompts("code", 20) + prompts("math", 20)
    labels = ["code"] * 20 + ["math"] * 20
    clf = TextClassifier(features=small_features()).fit(texts, labels)
    assert clf.weights_.shape[1] == 2
    assert clf.predict(prompts("math", 5, seed=3)).tolist() == ["math"] * 5


def test_partial_fit_from_cold_start_learns_and_adds_classes():
    texts, labels = labelled_prompts(40)
    features = small_features().fit(texts)
    clf = TextClassifier(features=features)
    with pytest.raises(ValueError, match="classes="):
        clf.partial_fit(texts[:5], labels[:5])
    test, truth = labelled_prompts(10, seed=9)
    order = np.random.default_rng(0).permutation(len(texts))
    clf.partial_fit([texts[i] for i in order[:40]], [labels[i] for i in order[:40]], classes=labels)
    early = np.mean(clf.predict(test) == np.array(truth))
    for start in range(40, len(texts), 40):
        rows = order[start : start + 40]
        clf.partial_fit([texts[i] for i in rows], [labels[i] for i in rows])
    late = np.mean(clf.predict(test) == np.array(truth))
    assert clf.n_partial_samples_ == len(texts)
    assert late >= early and late > 0.9
    clf.partial_fit(["brand new class text"], ["other"], classes=["other"])
    assert "other" in clf.classes_.tolist() and clf.weights_.shape[1] == 5
    with pytest.raises(ValueError, match="not among the classes"):
        clf.partial_fit(["x"], ["unknown"])


def test_state_round_trip_then_identical_updates():
    texts, labels = labelled_prompts(20)
    clf = TextClassifier(features=small_features()).fit(texts, labels)
    params, arrays = clf.get_state()
    back = TextClassifier.from_state(params, arrays)
    test, _ = labelled_prompts(5, seed=4)
    assert np.allclose(back.predict_proba(test), clf.predict_proba(test), atol=1e-6)
    more, more_labels = labelled_prompts(5, seed=11)
    clf.partial_fit(more, more_labels)
    back.partial_fit(more, more_labels)
    assert np.allclose(back.weights_, clf.weights_, atol=1e-6)


def test_softmax_rows():
    p = softmax(np.array([[1000.0, 1000.0], [0.0, np.log(3.0)]]))
    assert np.allclose(p, [[0.5, 0.5], [0.25, 0.75]])
