import json

import numpy as np
import pytest

from scheduler.errors import ConfigError, InputError
from scheduler.profile import build_profile, load_profile, save_profile
from scheduler.traces.store import RequestTrace, TraceSet
from tests.conftest import labelled_records, write_store


@pytest.fixture
def store(tmp_path, tiny_model):
    return TraceSet(
        write_store(tmp_path / "s", tiny_model, labelled_records(tiny_model), shard_size=5)
    )


def test_profile_by_label_sums_counts_per_class(store, tmp_path):
    profile = build_profile(store, by="label")
    assert list(profile.classes) == ["code", "math"]
    code = profile.classes["code"]
    expected = sum(r.counts["decode"] for r in store.records() if r.label == "code")
    assert np.array_equal(code.counts["decode"], expected)
    assert code.requests == 8 and code.tokens == {"prefill": 48, "decode": 32}
    assert sum(c.weight for c in profile.classes.values()) == pytest.approx(1.0)
    assert np.array_equal(code.placement_counts(), code.counts["decode"])

    save_profile(profile, tmp_path / "p.json")
    back = load_profile(tmp_path / "p.json")
    assert back.model == profile.model
    assert np.array_equal(
        back.classes["math"].counts["prefill"], profile.classes["math"].counts["prefill"]
    )
    assert json.loads((tmp_path / "p.json").read_text())["classes"]["code"]["weight"] == 0.5


def test_profile_by_cluster_recovers_the_two_groups(store):
    profile = build_profile(store, by="cluster", k=2, random_state=0)
    mixes = sorted(tuple(sorted(c.label_mix.items())) for c in profile.classes.values())
    assert mixes == [(("code", 8),), (("math", 8),)]


def test_profile_all_and_errors(store, tmp_path, tiny_model):
    assert list(build_profile(store, by="all").classes) == ["all"]
    with pytest.raises(ConfigError, match="needs --k"):
        build_profile(store, by="cluster")
    with pytest.raises(ConfigError, match="exceeds"):
        build_profile(store, by="cluster", k=99)
    unlabelled = write_store(
        tmp_path / "u",
        tiny_model,
        [RequestTrace("a", {"decode": np.ones((3, 8), np.int64)}, {"decode": 1})],
    )
    with pytest.raises(InputError, match="have no label"):
        build_profile(TraceSet(unlabelled), by="label")


def _profile_json(tiny_model):
    return {
        "model": tiny_model.to_dict(),
        "classes": {
            "a": {"weight": 0.5, "decode": [[1] * 8] * 3},
            "b": {"weight": 0.5, "prefill": [[2] * 8] * 3},
        },
    }


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["classes"]["a"].update(decode=[[1] * 7] * 3), "class 'a' decode has shape"),
        (lambda d: d["classes"]["a"].update(decode=[[-1] * 8] * 3), "negative counts"),
        (lambda d: d["classes"]["a"].update(decode=[[0] * 8] * 3), "class 'a' is empty"),
        (lambda d: d["classes"]["b"].pop("prefill"), "no decode, prefill or mixed"),
        (lambda d: d.update(classes={}), "non-empty"),
        (lambda d: d["classes"]["a"].update(weight=0.9), "sum to"),
        (lambda d: d["classes"]["a"].update(weight="x"), "weight must be"),
        (lambda d: d.pop("model"), "missing top-level key 'model'"),
        (lambda d: d["model"].update(num_experts=4), "top_k|shape"),
    ],
)
def test_invalid_profiles_name_the_problem(tmp_path, tiny_model, mutate, message):
    data = _profile_json(tiny_model)
    mutate(data)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=message) as err:
        load_profile(path)
    assert str(path) in str(err.value)


def test_non_json_profile(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("[1, 2")
    with pytest.raises(InputError, match="not valid JSON"):
        load_profile(path)


def test_profile_by_cluster_fits_on_a_sample_when_large(store, monkeypatch):
    import scheduler.profile as profile_module

    # room for 6 of the 16 requests' vectors: fit on a sample, assign everyone
    monkeypatch.setattr(profile_module, "MAX_CLUSTER_SAMPLE_BYTES", 6 * 3 * 8 * 4)
    profile = build_profile(store, by="cluster", k=2, random_state=1)
    assert sum(c.requests for c in profile.classes.values()) == 16
    mixes = sorted(tuple(sorted(c.label_mix.items())) for c in profile.classes.values())
    assert mixes == [(("code", 8),), (("math", 8),)]
