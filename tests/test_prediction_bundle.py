import json
import zipfile

import numpy as np
import pytest

from scheduler.errors import InputError
from scheduler.model_shape import PRESETS
from scheduler.prediction import bundle as bundle_mod
from scheduler.prediction.bundle import PredictorBundle, load_bundle, save_bundle
from scheduler.prediction.clusters import ActivationClusters
from scheduler.prediction.drift import ClassMixDrift
from scheduler.prediction.prefill_decode import PrefillDecodePredictor
from scheduler.prediction.text_classifier import TextClassifier
from scheduler.prediction.text_cluster import TextClusterClassifier
from scheduler.prediction.text_features import HashedTfidf
from tests.prediction_data import clustered_counts, labelled_prompts, prompts


@pytest.fixture
def full_bundle(tiny_model):
    texts, labels = labelled_prompts(15)
    domain = TextClassifier(features=HashedTfidf(word_bits=12, char_bits=14)).fit(texts, labels)
    counts, _ = clustered_counts(tiny_model, 10, groups=2)
    clusters = ActivationClusters(2).fit(counts)
    pair_texts = prompts("code", 10) + prompts("math", 10)
    text_cluster = TextClusterClassifier(
        clusters, text=TextClassifier(features=domain.features_)
    ).fit(pair_texts, counts)
    return PredictorBundle(
        domain=domain,
        domain_drift=ClassMixDrift().fit(labels),
        model=tiny_model,
        clusters=clusters,
        text_cluster=text_cluster,
        prefill_decode=PrefillDecodePredictor("ridge").fit(counts, counts[::-1]),
        metadata={"note": "test"},
    )


def test_round_trip_keeps_every_prediction(full_bundle, tmp_path, tiny_model):
    path = tmp_path / "b.npz"
    digest = save_bundle(full_bundle, path)
    back = load_bundle(path, model=tiny_model)
    texts, _ = labelled_prompts(3, seed=5)
    assert np.allclose(back.domain.predict_proba(texts), full_bundle.domain.predict_proba(texts))
    assert back.text_cluster is not None and full_bundle.text_cluster is not None
    assert np.array_equal(back.text_cluster.predict(texts), full_bundle.text_cluster.predict(texts))
    counts, _ = clustered_counts(tiny_model, 3, groups=2, seed=9)
    assert back.clusters is not None and back.prefill_decode is not None
    assert np.array_equal(back.clusters.predict(counts), full_bundle.clusters.predict(counts))
    assert np.allclose(
        back.prefill_decode.predict(counts), full_bundle.prefill_decode.predict(counts)
    )
    assert back.model == tiny_model and back.metadata == {"note": "test"}
    assert back.domain_drift is not None and back.text_cluster.drift_ is not None
    meta, _ = bundle_mod.read_bundle_meta(path)
    assert meta["sha256"] == digest and meta["format_version"] == bundle_mod.FORMAT_VERSION
    # the loaded text-to-cluster model keeps learning
    back.text_cluster.partial_fit(prompts("code", 4, seed=3), counts[:4])
    assert back.text_cluster.text_.n_partial_samples_ == 4


def test_domain_only_bundle(tmp_path):
    texts, labels = labelled_prompts(10)
    domain = TextClassifier(features=HashedTfidf(word_bits=12, char_bits=14)).fit(texts, labels)
    save_bundle(PredictorBundle(domain=domain), tmp_path / "d.npz")
    back = load_bundle(tmp_path / "d.npz", model=PRESETS["deepseek-v3"])  # no model to clash
    assert back.clusters is None and back.text_cluster is None and back.model is None


def _rewrite(path, change):
    """Load a bundle's arrays, let ``change(meta, arrays)`` edit them, write them back."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays.pop(bundle_mod.META_KEY).tobytes())
    change(meta, arrays)
    arrays[bundle_mod.META_KEY] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)


def _reseal(meta, arrays):
    meta["sha256"] = bundle_mod._digest(meta, arrays)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m, a: m.update(format_version=99), "format version 99"),
        (lambda m, a: m.update(format="something-else"), "not a moe-scheduler-predictors"),
        (lambda m, a: a["domain.intercept"].__iadd__(1.0), "checksum mismatch"),
        (lambda m, a: m["metadata"].update(note="edited"), "checksum mismatch"),
        (lambda m, a: (a.pop("clusters.centers"), _reseal(m, a)), "component 'clusters'"),
        (lambda m, a: (m["model"].update(num_experts=0), _reseal(m, a)), "invalid model"),
    ],
)
def test_refuses_modified_or_foreign_bundles(full_bundle, tmp_path, change, message):
    path = tmp_path / "b.npz"
    save_bundle(full_bundle, path)
    _rewrite(path, change)
    with pytest.raises(InputError, match=message):
        load_bundle(path)


def test_refuses_other_model_shape_and_non_bundles(full_bundle, tmp_path):
    path = tmp_path / "b.npz"
    save_bundle(full_bundle, path)
    with pytest.raises(InputError, match="fitted for model tiny .* not mixtral-8x7b"):
        load_bundle(path, model=PRESETS["mixtral-8x7b"])
    with pytest.raises(InputError, match="does not exist"):
        load_bundle(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(InputError, match="not an .npz archive"):
        load_bundle(tmp_path / "text.npz")
    np.savez(tmp_path / "pickled.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(InputError, match="Object arrays cannot be loaded"):
        load_bundle(tmp_path / "pickled.npz")
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(InputError, match="not a moe-scheduler-predictors bundle"):
        load_bundle(tmp_path / "plain.npz")
    with zipfile.ZipFile(path) as z:
        assert all(n.endswith(".npy") for n in z.namelist())
