import numpy as np
import pytest

from scheduler.prediction.datasets import split_tokens
from scheduler.prediction.prefill_decode import (
    PrefillDecodePredictor,
    evaluate_prediction,
    layer_shares,
)


def shifted_pairs(n=40, layers=2, experts=6, seed=0):
    """Decode favours expert (e + 1) % E whenever prefill favours e: a mapping the own-prefill
    baseline gets wrong and a per-layer linear model can learn."""
    rng = np.random.default_rng(seed)
    fav = rng.integers(0, experts, size=(n, layers))
    prefill = rng.poisson(1.0, size=(n, layers, experts)).astype(float)
    decode = rng.poisson(1.0, size=(n, layers, experts)).astype(float)
    for i in range(n):
        for layer in range(layers):
            prefill[i, layer, fav[i, layer]] += 20
            decode[i, layer, (fav[i, layer] + 1) % experts] += 20
    return prefill, decode


def test_baseline_is_the_request_own_prefill_histogram():
    prefill, decode = shifted_pairs()
    base = PrefillDecodePredictor("prefill").fit(prefill, decode)
    assert np.allclose(base.predict(prefill), layer_shares(prefill))
    prior = PrefillDecodePredictor("prior").fit(prefill, decode)
    assert np.allclose(prior.predict(prefill[:2])[0], layer_shares(decode).mean(axis=0))


def test_ridge_learns_a_mapping_the_baseline_misses():
    prefill, decode = shifted_pairs(seed=1)
    test_pre, test_dec = shifted_pairs(n=20, seed=2)
    ridge = PrefillDecodePredictor("ridge").fit(prefill, decode)
    base = PrefillDecodePredictor("prefill").fit(prefill, decode)
    r = evaluate_prediction(ridge.predict(test_pre), test_dec, k=1, m=2)
    b = evaluate_prediction(base.predict(test_pre), test_dec, k=1, m=2)
    assert r["recall_at_k_mean"] == pytest.approx(1.0)
    assert b["recall_at_k_mean"] < 0.3
    assert r["pearson_mean"] > 0.9 > b["pearson_mean"]
    pred = ridge.predict(test_pre)
    assert np.all(pred >= 0) and np.allclose(pred.sum(axis=-1), 1)
    back = PrefillDecodePredictor.from_state(*ridge.get_state())
    assert np.allclose(back.predict(test_pre), pred)


def test_evaluation_of_a_perfect_prediction_and_errors():
    _, decode = shifted_pairs(n=5)
    scores = evaluate_prediction(layer_shares(decode), decode, k=2, m=3)
    assert scores["pearson_mean"] == pytest.approx(1.0)
    assert scores["recall_at_k_mean"] == pytest.approx(1.0)
    assert scores["mass_at_m_mean"] <= 1 and len(scores["pearson"]) == 2
    with pytest.raises(ValueError, match="method"):
        PrefillDecodePredictor("magic").fit(decode, decode)
    with pytest.raises(ValueError, match="at least 3"):
        PrefillDecodePredictor("ridge").fit(decode[:2], decode[:2])
    with pytest.raises(ValueError, match="shape"):
        PrefillDecodePredictor("prior").fit(decode, decode).predict(decode[:, :1])


def test_split_tokens_is_the_early_late_proxy():
    ids = np.array([[[0, 1]], [[0, 2]], [[3, 1]], [[2, 3]]])  # 4 tokens, 1 layer, top-2
    early, late = split_tokens([ids], 4, 0.5)
    assert early[0, 0].tolist() == [2, 1, 1, 0] and late[0, 0].tolist() == [0, 1, 1, 2]
    early, late = split_tokens([ids], 4, 0.01)  # at least one token on each side
    assert early[0].sum() == 2 and late[0].sum() == 6
    with pytest.raises(ValueError, match="two tokens"):
        split_tokens([ids[:1]], 4, 0.5)


def test_blending_leans_on_the_prior_for_short_prefills() -> None:
    from scheduler.prediction.prefill_decode import (
        BLEND_N0,
        prefill_tokens,
        quality_by_length,
    )

    rng = np.random.default_rng(3)
    layers, experts, top_k, n = 2, 8, 2, 60
    lengths = rng.choice([1, 2, 40, 400], size=n)
    prefill = np.zeros((n, layers, experts))
    for i, t in enumerate(lengths):
        for layer in range(layers):
            prefill[i, layer] = np.bincount(rng.integers(0, experts, t * top_k), minlength=experts)
    decode = rng.poisson(5.0, (n, layers, experts)).astype(float)
    np.testing.assert_allclose(prefill_tokens(prefill, top_k), lengths)

    model = PrefillDecodePredictor("ridge", top_k=top_k).fit(prefill, decode)
    assert model.blend_n0_ in BLEND_N0
    model.blend_n0_ = 16.0
    w = model.weight(prefill)
    assert np.all(np.diff(w[np.argsort(lengths)]) >= 0) and 0 < w.min() < w.max() < 1
    pred = model.predict(prefill)
    np.testing.assert_allclose(pred.sum(axis=-1), 1.0)
    # The shortest prefills end near the prior, the longest near the ridge prediction.
    plain = PrefillDecodePredictor("ridge", blend=False, top_k=top_k).fit(prefill, decode)
    assert plain.blend_n0_ == 0
    short = lengths == 1
    assert (
        np.abs(pred[short] - model.prior_).sum()
        < np.abs(plain.predict(prefill)[short] - plain.prior_).sum()
    )
    # A class prior, given per request, is what short prefills lean on instead.
    prior = np.zeros((layers, experts))
    prior[:, 0] = 1.0
    assert (model.predict(prefill[short], prior=prior)[:, :, 0] > 0.9).all()

    restored = PrefillDecodePredictor.from_state(*model.get_state())
    np.testing.assert_allclose(restored.predict(prefill), pred)
    buckets = quality_by_length(pred, decode, prefill, k=top_k, top_k=top_k)
    assert [b["tokens"] for b in buckets] == ["<= 8", "(32, 128]", "(128, 512]"]
    assert sum(b["requests"] for b in buckets) == n and "pearson_mean" in buckets[0]


def test_a_bundle_from_before_blending_loads_without_it() -> None:
    rng = np.random.default_rng(0)
    prefill = rng.poisson(3.0, (10, 2, 4)).astype(float)
    model = PrefillDecodePredictor("ridge").fit(prefill, prefill)
    params, arrays = model.get_state()
    old = {k: v for k, v in params.items() if k in ("method", "alphas")}
    loaded = PrefillDecodePredictor.from_state(old, arrays)
    assert loaded.blend_n0_ == 0 and not loaded.blend
