import numpy as np
import pytest

from scheduler.analysis import stats


def test_load_imbalance_and_hottest():
    counts = np.array([[4.0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    imb = stats.load_imbalance(counts)
    assert imb[:2].tolist() == [4.0, 1.0] and np.isnan(imb[2])
    assert stats.hottest_experts(counts, 1) == [(0, 0, 4.0)]


def test_js_divergence_bounds():
    p = np.array([[1.0, 0], [1, 1]])
    assert stats.js_divergence(p, p).tolist() == [0.0, 0.0]
    assert stats.js_divergence(np.array([1.0, 0]), np.array([0.0, 1])) == pytest.approx(1.0)
    pairs = stats.pairwise_js({"a": p, "b": p[::-1], "c": p})
    assert set(pairs) == {("a", "b"), ("a", "c"), ("b", "c")}


def test_pearson_per_layer():
    a = np.array([[1.0, 2, 3], [1, 1, 1]])
    r = stats.pearson_per_layer(a, np.array([[2.0, 4, 6], [1, 2, 3]]))
    assert r[0] == pytest.approx(1.0) and np.isnan(r[1])


def test_coactivation_counts_pairs_and_lift():
    ids = np.array([[[0, 1]], [[0, 1]], [[2, 3]], [[0, -1]]])
    co = stats.coactivation(ids, 4)
    assert co[0, 0, 1] == 2 and co[0, 0, 0] == 3 and co[0, 2, 3] == 1 and co[0, 0, 2] == 0
    lift = stats.coactivation_lift(co, 4, min_expected=0.1)
    assert lift[0, 0, 1] == pytest.approx(2 / (4 * 0.75 * 0.5))
    uniform = np.ones((1, 5, 5))
    assert stats.top_pair_share(uniform, 0.1)[0] == pytest.approx(0.1)


def test_class_accuracy_separable_and_random():
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b"], 20)
    vectors = rng.random((40, 2, 6))
    vectors[:20, 0, 0] += 5  # layer 0 separates the classes; layer 1 does not
    acc = stats.class_accuracy_per_layer(vectors, labels, n_splits=3)
    assert acc[0] == 1.0 and acc[1] < 0.9
