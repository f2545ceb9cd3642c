import numpy as np
import pytest

from scheduler.prediction.cluster_selection import layer_subset, select_clusters
from scheduler.prediction.clusters import ActivationClusters, paper_b_vectors
from scheduler.prediction.datasets import load_routing
from scheduler.prediction.locality import (
    hot_set_mask,
    locality,
    oracle_locality,
    partition_mask,
    per_node_capacity,
    top_mask,
)
from scheduler.profile import fit_request_clusters, request_activation_vectors
from scheduler.traces.store import TraceSet
from tests.conftest import labelled_records, write_store
from tests.prediction_data import clustered_counts


def same_partition(a, b):
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_share_features_are_paper_b_vectors_and_clusters_match_profile(tmp_path, tiny_model):
    store = TraceSet(write_store(tmp_path / "s", tiny_model, labelled_records(tiny_model)))
    routing = load_routing(store)
    batch = next(store.batches())
    assert np.allclose(paper_b_vectors(routing.counts), request_activation_vectors(batch))
    ours = ActivationClusters(2, random_state=0).fit(routing.counts)
    theirs = fit_request_clusters(store, 2, random_state=0)
    assert same_partition(ours.labels_, theirs.labels_)
    assert same_partition(ours.labels_, np.array(routing.labels))


@pytest.mark.parametrize(
    "kw", [{"features": "share"}, {"features": "share-idf"}, {"features": "top-mask", "top_m": 2}]
)
def test_every_feature_kind_recovers_groups_and_round_trips(tiny_model, kw):
    counts, group = clustered_counts(tiny_model, 10, groups=2)
    model = ActivationClusters(2, **kw).fit(counts)
    assert same_partition(model.labels_, group)
    assert np.array_equal(model.predict(counts), model.labels_)
    assert model.cluster_counts_.shape == (2, 3, 8)
    assert np.allclose(model.cluster_counts_.sum(axis=0), counts.sum(axis=0))
    assert model.weights_.sum() == pytest.approx(1)
    back = ActivationClusters.from_state(*model.get_state())
    assert np.array_equal(back.predict(counts), model.predict(counts))


def test_cluster_parameter_errors(tiny_model):
    counts, _ = clustered_counts(tiny_model, 3)
    with pytest.raises(ValueError, match="top_m"):
        ActivationClusters(2, features="top-mask").fit(counts)
    with pytest.raises(ValueError, match="features"):
        ActivationClusters(2, features="nope").fit(counts)
    with pytest.raises(ValueError, match="n_clusters"):
        ActivationClusters(99).fit(counts)
    with pytest.raises(ValueError, match="layers"):
        ActivationClusters(2, layers=(5,)).fit(counts)
    model = ActivationClusters(2, layers=layer_subset("second-half", 3)).fit(counts)
    assert model.layers_.tolist() == [1, 2] and model.centers_.shape == (2, 16)


def test_locality_proxy_on_a_hand_made_case():
    # 2 clusters, 1 layer, 4 experts, 2 nodes -> 2 experts per node
    cluster_counts = np.array([[[9.0, 8, 1, 0]], [[7.0, 0, 6, 5]]])
    hot = hot_set_mask(cluster_counts, 2)
    assert hot[:, 0].tolist() == [[True, True, False, False], [True, False, True, False]]
    part = partition_mask(cluster_counts, 2)
    assert part.sum(axis=0).tolist() == [[1, 1, 1, 1]]  # every expert exactly once
    assert part[:, 0].tolist() == [[True, True, False, False], [False, False, True, True]]
    counts = np.array([[[2.0, 2, 0, 0]], [[1.0, 0, 1, 2]]])
    assign = np.array([0, 1])
    assert locality(hot, assign, counts) == pytest.approx((4 + 2) / 8)
    assert locality(part, assign, counts) == pytest.approx((4 + 3) / 8)
    assert oracle_locality(counts, 2) == pytest.approx((4 + 3) / 8)
    assert top_mask(np.array([1.0, 1, 1]), 1).tolist() == [True, False, False]
    with pytest.raises(ValueError, match="evenly"):
        per_node_capacity(10, 4)


def test_selection_scores_every_candidate_and_beats_one_cluster(tiny_model):
    counts, group = clustered_counts(tiny_model, 12, groups=2, seed=1)
    model, candidates = select_clusters(
        counts, nodes=4, labels=group, features=("share", "top-mask"), layer_sets=("all",)
    )
    assert len(candidates) == 1 + 3 * 2  # K=1, then K=2..4 x two feature kinds
    best = candidates[0]
    assert (model.n_clusters, model.features) == (best.k, best.features)
    assert all(a.locality >= b.locality for a, b in zip(candidates, candidates[1:], strict=False))
    one = next(c for c in candidates if c.k == 1)
    assert best.locality > one.locality + 0.05  # clustering beats no clustering
    assert next(c for c in candidates if c.k == 4).partition_locality is not None
    assert next(c for c in candidates if c.k == 2).partition_locality is None
    with pytest.raises(ValueError, match="evenly"):
        select_clusters(counts, nodes=3)
