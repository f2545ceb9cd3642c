import numpy as np
import pytest

from scheduler.prediction.evaluation import interleaved_latency, single_request_latency
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


def test_features_collapse_whitespace_and_truncate():
    f = small_features(min_df=1, keep_char_case=False, shape_tokens=False)
    f.fit(["hello world", "other words here"])
    a = f.transform_one("Hello \n  World")
    b = f.transform_one("hello world")
    assert np.array_equal(a[0], b[0]) and np.allclose(a[1], b[1])
    f = small_features(min_df=1, max_chars=12).fit(["hello world", "other words here"])
    long_a = f.transform_one("hello world and more text")
    long_b = f.transform_one("hello world and different")
    assert np.array_equal(long_a[0], long_b[0])  # only the first 12 characters count


def test_character_case_and_shape_tokens_are_features():
    texts = ["Hello World 123", "hello world", "x = [1, 2]\ny = 3", "plain words only"]
    texts += ["one two three four", "one\ntwo\nthree\nfour"]
    word_space = 1 << 12
    cased = small_features(min_df=1, shape_tokens=False).fit(texts)
    upper, lower = cased.transform_one("Hello World"), cased.transform_one("hello world")
    # the word block ignores case, the character block does not
    assert np.array_equal(upper[0][upper[0] < word_space], lower[0][lower[0] < word_space])
    assert not np.array_equal(upper[0], lower[0])
    plain = small_features(min_df=1, shape_tokens=False).fit(texts)
    shaped = small_features(min_df=1).fit(texts)
    for text in texts:
        idx, _ = shaped.transform_one(text)
        base, _ = plain.transform_one(text)
        extra = np.setdiff1d(idx, base)
        # up to five shape tokens, all in the word block (fewer when buckets coincide)
        assert 1 <= len(extra) <= 5 and np.all(extra < word_space)
    # the same text with more lines or digits gets other shape buckets
    a, _ = shaped.transform_one("one two three four")
    b, _ = shaped.transform_one("one\ntwo\nthree\nfour")
    assert not np.array_equal(a[a < word_space], b[b < word_space])


def test_min_df_drops_rare_buckets_and_empty_text_is_safe():
    texts = ["alpha beta", "alpha gamma", "zzzzqqqq"]
    f = small_features(min_df=2, shape_tokens=False).fit(texts)
    idx, _ = f.transform_one("zzzzqqqq")
    assert len(idx) == 0  # seen in one document only
    assert len(f.transform_one("")[0]) == 0
    # with shape tokens, only those (shared with the other texts) are left
    f = small_features(min_df=2).fit(texts)
    idx, _ = f.transform_one("zzzzqqqq")
    assert 0 < len(idx) <= 5 and np.all(idx < (1 << f.word_bits))
    assert len(f.transform_one("")[0]) <= 5
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


def test_state_from_before_the_case_and_shape_options_reads_as_without_them():
    texts, _ = labelled_prompts(5)
    f = small_features(min_df=1).fit(texts)
    params, arrays = f.get_state()
    assert params["keep_char_case"] and params["shape_tokens"]
    back = HashedTfidf.from_state(params, arrays)
    assert np.array_equal(back.transform_one("Some Text 1")[0], f.transform_one("Some Text 1")[0])
    old = small_features(min_df=1, keep_char_case=False, shape_tokens=False).fit(texts)
    params, arrays = old.get_state()
    del params["keep_char_case"], params["shape_tokens"]  # as written before they existed
    back = HashedTfidf.from_state(params, arrays)
    assert not back.keep_char_case and not back.shape_tokens
    a, b = back.transform_one("Some Text 1"), old.transform_one("Some Text 1")
    assert np.array_equal(a[0], b[0]) and np.allclose(a[1], b[1])


def test_latency_reports_every_predictor_without_judging_speed():
    texts = ["one", "two words", "three more words"]
    calls: list[str] = []
    out = interleaved_latency(
        {"a": lambda t: calls.append("a"), "b": lambda t: calls.append("b")},
        texts,
        warmup=2,
        repeats=2,
    )
    assert set(out) == {"a", "b"} and calls.count("a") == calls.count("b") == 2 + 2 * 3
    for report in out.values():
        assert report["requests"] == 3 and report["repeats"] == 2
        assert 0 <= report["p50_ms"] <= report["p99_ms"] <= report["max_ms"]
        assert set(report["median_of_repeats"]) == {"p50_ms", "p90_ms", "p99_ms", "max_ms"}
    single = single_request_latency(len, texts, warmup=1)
    assert single["requests"] == 3 and "median_of_repeats" not in single
    with pytest.raises(ValueError, match="no texts"):
        single_request_latency(len, [])


def test_bucket_counts_match_unique_and_whitespace_split_matches_regex():
    import re

    f = small_features(min_df=1)
    texts, _ = labelled_prompts(10)
    texts += ["", "a", "ab", "aaaa aaaa", "\u00a0x\u2003y\x1cz\n\tq  "]
    f.fit(texts)
    for text in texts:
        raw, n_raw = f._buckets(text)
        buckets, counts, n_word = f.bucket_counts(text)
        want, want_counts = np.unique(raw, return_counts=True)
        assert np.array_equal(buckets, want) and np.array_equal(counts, want_counts)
        assert n_word == int(np.searchsorted(want, 1 << f.word_bits))
        _, tf, _ = f.term_frequencies(text)
        assert np.array_equal(tf, (1.0 + np.log(want_counts)).astype(np.float32))
        assert f.normalise(text) == re.sub(r"\s+", " ", text[: f.max_chars]).strip()


def test_sublinear_tf_table_and_fallback_agree_with_the_logarithm():
    from scheduler.prediction.text_features import sublinear_tf

    counts = np.array([1, 2, 3, 100, (1 << 14) - 1])
    want = (1.0 + np.log(counts)).astype(np.float32)
    assert np.array_equal(sublinear_tf(counts), want)
    big = np.array([1, 1 << 14, 1 << 20])
    assert np.array_equal(sublinear_tf(big), (1.0 + np.log(big)).astype(np.float32))
    assert sublinear_tf(np.zeros(0, dtype=np.int64)).shape == (0,)


def test_fast_path_scores_track_weight_changes():
    texts, labels = labelled_prompts(20)
    clf = TextClassifier(features=small_features()).fit(texts, labels)
    test, _ = labelled_prompts(5, seed=4)
    for text, row in zip(test, clf.decision_function(test), strict=True):
        assert np.allclose(clf._scores_one(text), row, atol=1e-5)
    # the score table is rebuilt after partial_fit, new classes and from_state
    more, more_labels = labelled_prompts(5, seed=11)
    clf.partial_fit(more, more_labels)
    assert np.allclose(clf._scores_one(test[0]), clf.decision_function(test[:1])[0], atol=1e-5)
    clf.partial_fit(["brand new class text"], ["other"], classes=["other"])
    proba = clf.predict_proba(test[:1])[0]
    assert np.allclose(clf.predict_one_proba(test[0]), proba, atol=1e-5)
    back = TextClassifier.from_state(*clf.get_state())
    assert np.allclose(back.predict_one_proba(test[0]), proba, atol=1e-5)
