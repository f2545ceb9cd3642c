import json

import numpy as np
import pytest

from scheduler.errors import InputError
from scheduler.traces.store import RequestTrace, TraceSet, TraceWriter, expert_counts
from tests.conftest import labelled_records, write_store


def test_expert_counts_ignores_unrecorded_slots():
    ids = np.array([[[0, 1], [2, 3]], [[1, -1], [-1, -1]]])
    counts = expert_counts(ids, 4)
    assert counts.tolist() == [[1, 2, 0, 0], [0, 0, 1, 1]]


def test_round_trip_keeps_every_field(tmp_path, tiny_model):
    records = labelled_records(tiny_model, per_class=3)
    records[0].dp_rank, records[0].arrival_s, records[0].finish_s = 3, 1.5, 2.25
    records[1].label, records[1].prompt = None, "naïve ☃ prompt"
    records[2].gate_weights = {"prefill": np.full(records[2].token_ids["prefill"].shape, 0.25)}
    write_store(tmp_path / "s", tiny_model, records, shard_size=2)

    ts = TraceSet(tmp_path / "s")
    assert ts.num_requests == 6 and len(ts.shards) == 3 and ts.phases == ["prefill", "decode"]
    back = list(ts.records())
    for a, b in zip(records, back, strict=True):
        assert (a.request_id, a.label, a.prompt) == (b.request_id, b.label, b.prompt)
        for phase in ("prefill", "decode"):
            assert np.array_equal(a.counts[phase], b.counts[phase])
            assert np.array_equal(a.token_ids[phase], b.token_ids[phase])
            assert a.tokens[phase] == b.tokens[phase]
    assert (back[0].dp_rank, back[0].arrival_s, back[0].finish_s) == (3, 1.5, 2.25)
    assert back[1].dp_rank is None and back[1].arrival_s is None
    assert np.allclose(back[2].gate_weights["prefill"], 0.25)
    assert "prefill" not in back[3].gate_weights


def test_counts_only_and_phase_subsets(tmp_path, tiny_model):
    big = np.zeros((3, 8), dtype=np.int64)
    big[0, 0] = 100_000  # needs uint32
    records = [
        RequestTrace("a", {"decode": big}, {"decode": 50_000}),
        RequestTrace("b", {"prefill": np.ones((3, 8), np.int64)}, {"prefill": 4}),
    ]
    write_store(tmp_path / "s", tiny_model, records)
    a, b = TraceSet(tmp_path / "s").records()
    assert a.counts["decode"][0, 0] == 100_000 and set(a.counts) == {"decode"}
    assert set(b.counts) == {"prefill"} and not b.token_ids


@pytest.mark.parametrize(
    "record, message",
    [
        (RequestTrace("x", {"decode": np.ones((2, 8), np.int64)}, {"decode": 1}), "shape"),
        (RequestTrace("x", {"decode": -np.ones((3, 8), np.int64)}, {"decode": 1}), "negative"),
        (RequestTrace("x", {"other": np.ones((3, 8), np.int64)}, {"other": 1}), "unknown phase"),
        (RequestTrace("x", {}, {}), "no routing"),
        (
            RequestTrace(
                "x",
                {"decode": np.ones((3, 8), np.int64)},
                {"decode": 1},
                token_ids={"decode": np.full((1, 3, 2), 8)},
            ),
            "out of range",
        ),
    ],
)
def test_invalid_records_abort_without_output(tmp_path, tiny_model, record, message):
    with pytest.raises(InputError, match=message), TraceWriter(tmp_path / "s", tiny_model) as w:
        w.add(RequestTrace("ok", {"decode": np.ones((3, 8), np.int64)}, {"decode": 1}))
        w.add(record)
    assert list(tmp_path.iterdir()) == []


def test_duplicate_ids_and_existing_output(tmp_path, tiny_model):
    rec = RequestTrace("dup", {"decode": np.ones((3, 8), np.int64)}, {"decode": 1})
    with pytest.raises(InputError, match="duplicate"), TraceWriter(tmp_path / "s", tiny_model) as w:
        w.add(rec)
        w.add(rec)
    write_store(tmp_path / "s", tiny_model, [rec])
    with pytest.raises(InputError, match="already exists"):
        write_store(tmp_path / "s", tiny_model, [rec])
    write_store(tmp_path / "s", tiny_model, [rec], overwrite=True)
    assert TraceSet(tmp_path / "s").num_requests == 1


def test_corrupt_stores_name_the_file(tmp_path, tiny_model):
    write_store(tmp_path / "s", tiny_model, labelled_records(tiny_model, 2))
    shard = tmp_path / "s" / "shard-00000.npz"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(InputError, match="shard-00000.npz: corrupt shard"):
        list(TraceSet(tmp_path / "s").batches())
    with pytest.raises(InputError, match="not a trace store"):
        TraceSet(tmp_path)
    manifest = tmp_path / "s" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": 99}))
    with pytest.raises(InputError, match="unsupported version"):
        TraceSet(tmp_path / "s")
