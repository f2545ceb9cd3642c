"""The SGLang /generate importer (meta_info.routed_experts)."""

from __future__ import annotations

import base64
import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scheduler.errors import InputError
from scheduler.model_shape import ModelShape
from scheduler.traces.importers import sglang_generate
from scheduler.traces.importers.sglang_generate import encode_routed_experts, read
from scheduler.traces.store import TraceSet, TraceWriter, expert_counts

#: 4 hidden layers, layer 0 dense; 8 experts, top-2.
TINY = ModelShape("tiny", 4, (1, 2, 3), 8, 2, 16)


def routing(rows: int, seed: int = 0) -> np.ndarray:
    """[rows, hidden_layers, top_k] ids as SGLang sends them: dense layer 0 all zeros."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((rows, TINY.num_hidden_layers, TINY.top_k), dtype=np.int32)
    for r in range(rows):
        for layer in TINY.moe_layer_ids:
            ids[r, layer] = rng.choice(TINY.num_experts, TINY.top_k, replace=False)
    return ids


def response(
    rid: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    start_len: int = 0,
    seed: int = 0,
    **extra: Any,
) -> tuple[dict[str, Any], np.ndarray]:
    """A /generate response and the full routing it encodes."""
    ids = routing(prompt_tokens + completion_tokens - 1 - start_len, seed)
    meta: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "routed_experts": encode_routed_experts(ids),
        "e2e_latency": 0.5,
    }
    if rid is not None:
        meta["id"] = rid
    body: dict[str, Any] = {"text": "out", "meta_info": meta, **extra}
    if start_len:
        body["routed_experts_start_len"] = start_len
    return body, ids


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def records(path: Path) -> list:
    source = read(path, TINY)
    return list(source.records)


def moe(ids: np.ndarray) -> np.ndarray:
    return ids[:, list(TINY.moe_layer_ids), :]


def test_encode_decode_round_trip() -> None:
    ids = routing(5)
    back = sglang_generate.decode_routed_experts(encode_routed_experts(ids), TINY)
    np.testing.assert_array_equal(back, ids)
    # the wire format is plain little-endian int32
    raw = base64.b64decode(encode_routed_experts(ids))
    np.testing.assert_array_equal(np.frombuffer(raw, "<i4"), ids.ravel())
    with pytest.raises(ValueError, match="tokens, hidden_layers, top_k"):
        encode_routed_experts(np.zeros((2, 3)))


def test_round_trip_prefill_decode_split(tmp_path: Path) -> None:
    first, ids1 = response(
        "a", 5, 4, seed=1, prompt="hello", label="math", arrival_s=1.5, finish_s=2.0
    )
    first["meta_info"]["dp_rank"] = 3
    second, ids2 = response("b", 3, 1, seed=2)  # one output token: no decode rows
    source = read(write_jsonl(tmp_path / "gen.jsonl", [first, second]), TINY)
    assert source.granularity == "request"
    assert source.model == TINY
    assert source.provenance == {"importer": "sglang-generate", "path": str(tmp_path / "gen.jsonl")}
    a, b = source.records

    assert a.request_id == "a"
    assert (a.label, a.prompt, a.dp_rank, a.arrival_s, a.finish_s) == ("math", "hello", 3, 1.5, 2.0)
    assert a.tokens == {"prefill": 5, "decode": 3}
    np.testing.assert_array_equal(a.token_ids["prefill"], moe(ids1[:5]))
    np.testing.assert_array_equal(a.token_ids["decode"], moe(ids1[5:]))
    np.testing.assert_array_equal(a.counts["prefill"], expert_counts(moe(ids1[:5]), 8))
    np.testing.assert_array_equal(a.counts["decode"], expert_counts(moe(ids1[5:]), 8))
    # dense layer 0 (all zeros, which would read as expert 0) is dropped
    assert a.counts["prefill"].shape == (3, 8)
    assert a.counts["prefill"].sum() == 5 * 3 * 2

    assert b.tokens == {"prefill": 3}
    assert "decode" not in b.counts
    assert (b.label, b.prompt, b.dp_rank, b.arrival_s) == (None, None, None, None)


def test_start_len(tmp_path: Path) -> None:
    partial, ids = response("p", 6, 3, start_len=4)  # rows for positions 4..7
    assert len(ids) == 4
    decode_only, ids_d = response("d", 6, 3, start_len=6, seed=3)
    [p, d] = records(write_jsonl(tmp_path / "gen.jsonl", [partial, decode_only]))
    assert p.tokens == {"prefill": 2, "decode": 2}
    np.testing.assert_array_equal(p.token_ids["prefill"], moe(ids[:2]))
    np.testing.assert_array_equal(p.token_ids["decode"], moe(ids[2:]))
    assert d.tokens == {"decode": 2}
    np.testing.assert_array_equal(d.token_ids["decode"], moe(ids_d))


def test_batch_arrays_default_ids_and_json_file(tmp_path: Path) -> None:
    r1, _ = response(None, 2, 2, seed=1)
    r2, _ = response("x", 2, 2, seed=2)
    r3, _ = response(None, 2, 2, seed=3)
    path = write_jsonl(tmp_path / "gen.jsonl", [[r1, r2], "", r3])
    assert [r.request_id for r in records(path)] == ["line1-1", "x", "line3"]

    single = tmp_path / "one.json"
    single.write_text(json.dumps(r2))
    assert [r.request_id for r in records(single)] == ["x"]
    many = tmp_path / "many.json"
    many.write_text(json.dumps([r1, r2]))
    assert [r.request_id for r in records(many)] == ["response1", "x"]


def test_gz_input_and_store_round_trip(tmp_path: Path) -> None:
    lines = [response(f"r{i}", 3 + i, 2 + i, seed=i)[0] for i in range(4)]
    path = write_jsonl(tmp_path / "gen.jsonl.gz", lines)
    source = read(path, TINY)
    originals = list(read(write_jsonl(tmp_path / "plain.jsonl", lines), TINY).records)
    with TraceWriter(
        tmp_path / "store",
        TINY,
        granularity=source.granularity,
        source=source.provenance,
        source_path=path,
        shard_size=3,
    ) as writer:
        for record in source.records:
            writer.add(record)
    back = list(TraceSet(tmp_path / "store").records())
    assert [r.request_id for r in back] == [r.request_id for r in originals]
    for got, want in zip(back, originals, strict=True):
        assert got.tokens == want.tokens
        assert set(got.counts) == set(want.counts)
        for phase in want.counts:
            np.testing.assert_array_equal(got.counts[phase], want.counts[phase])
            np.testing.assert_array_equal(got.token_ids[phase], want.token_ids[phase])


def test_records_stream_lazily(tmp_path: Path) -> None:
    good, _ = response("ok", 2, 2)
    path = write_jsonl(tmp_path / "gen.jsonl", [good, "not json"])
    stream = iter(read(path, TINY).records)
    assert next(stream).request_id == "ok"  # the bad second line is not read yet
    with pytest.raises(InputError, match="line 2"):
        next(stream)


def test_default_model_is_deepseek_v3(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "gen.jsonl", [])
    assert read(path, None).model.name == "deepseek-v3"


def _bad(**changes: Any) -> dict[str, Any]:
    body, _ = response("r", 3, 2)
    for key, value in changes.items():
        if key.startswith("meta_"):
            body["meta_info"][key.removeprefix("meta_")] = value
        else:
            body[key] = value
    return body


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('"a string"', "expected a /generate response object"),
        (json.dumps({"text": "x"}), "meta_info is missing"),
        (json.dumps(_bad(meta_routed_experts=None)), "--enable-return-routed-experts"),
        (json.dumps(_bad(meta_routed_experts="@@not base64@@")), "not valid base64"),
        (
            json.dumps(_bad(meta_routed_experts=encode_routed_experts(np.zeros((1, 4, 3))))),
            "not a whole number of rows",
        ),
        (
            json.dumps(_bad(meta_routed_experts=encode_routed_experts(np.zeros((3, 4, 2))))),
            "has 3 rows, expected 4",
        ),
        (
            json.dumps(_bad(meta_routed_experts=encode_routed_experts(np.full((4, 4, 2), 8)))),
            "expert id 8 out of range",
        ),
        (
            json.dumps(_bad(meta_routed_experts=encode_routed_experts(np.full((4, 4, 2), -3)))),
            "expert id -3 out of range",
        ),
        (json.dumps(_bad(routed_experts_start_len=4)), "outside [0, 3]"),
        (json.dumps(_bad(meta_prompt_tokens=None)), "meta_info.prompt_tokens is missing"),
        (json.dumps(_bad(meta_completion_tokens=-1)), "must be a non-negative integer"),
        (json.dumps(_bad(label=[1])), "label must be"),
        (json.dumps(_bad(arrival_s="soon")), "arrival_s must be a number"),
    ],
)
def test_errors_name_path_and_line(tmp_path: Path, line: str, message: str) -> None:
    good, _ = response("first", 2, 2)
    path = write_jsonl(tmp_path / "gen.jsonl", [good, line])
    with pytest.raises(InputError) as info:
        records(path)
    text = str(info.value)
    assert text.startswith(f"{path}: line 2")
    assert message in text


def test_out_of_range_id_in_dense_layer_is_ignored(tmp_path: Path) -> None:
    ids = routing(4)
    ids[:, 0, :] = 99  # dense layer rows are dropped before the range check
    body, _ = response("r", 3, 2)
    body["meta_info"]["routed_experts"] = encode_routed_experts(ids)
    [record] = records(write_jsonl(tmp_path / "gen.jsonl", [body]))
    np.testing.assert_array_equal(record.token_ids["prefill"], moe(ids[:3]))


def test_duplicate_ids_and_batch_item_location(tmp_path: Path) -> None:
    r, _ = response("same", 2, 2)
    with pytest.raises(InputError, match="line 2: duplicate request id 'same'"):
        records(write_jsonl(tmp_path / "dup.jsonl", [r, r]))
    with pytest.raises(InputError, match="line 1, item 2: meta_info is missing"):
        records(write_jsonl(tmp_path / "batch.jsonl", [[r, {"text": ""}]]))


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read(tmp_path / "missing.jsonl", TINY)
    damaged = tmp_path / "gen.jsonl.gz"
    damaged.write_bytes(b"definitely not gzip")
    with pytest.raises(InputError, match=r"gen\.jsonl\.gz: line 1: cannot read"):
        records(damaged)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"a": 1}\n{"b": 2}\n')
    with pytest.raises(InputError, match=r"bad\.json: not JSON"):
        records(bad_json)
