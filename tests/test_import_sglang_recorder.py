"""The SGLang expert-distribution recorder importer (per_token / per_pass .pt dumps)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="reading SGLang .pt dumps needs torch (pip install torch==2.13.0)"
)

from scheduler.errors import InputError, MissingDependencyError  # noqa: E402
from scheduler.model_shape import ModelShape  # noqa: E402
from scheduler.traces.importers import detect_format, import_traces  # noqa: E402
from scheduler.traces.importers.sglang_recorder import (  # noqa: E402
    TORCH_MISSING,
    detect_pt_kind,
    load_pt,
    read,
)
from scheduler.traces.store import TraceSet, TraceWriter, expert_counts  # noqa: E402

#: 4 hidden layers, layer 0 dense; 8 experts, top-2.
TINY = ModelShape("tiny", 4, (1, 2, 3), 8, 2, 16)
NUM_PHYSICAL = 10
EXTEND, DECODE, MIXED, IDLE = 1, 2, 3, 4

#: physical slot -> logical expert, per hidden layer. Slots 8 and 9 are redundant copies;
#: each layer uses a different permutation so a mix-up of layers shows.
P2L = np.array(
    [
        [0, 1, 2, 3, 4, 5, 6, 7, 0, 1],  # dense layer: never routed
        [7, 6, 5, 4, 3, 2, 1, 0, 7, 3],
        [1, 2, 3, 4, 5, 6, 7, 0, 2, 2],
        [3, 0, 1, 2, 7, 4, 6, 5, 0, 5],
    ],
    dtype=np.int64,
)


def physical_topk(tokens: int, seed: int) -> np.ndarray:
    """[hidden_layers, tokens, 8] physical ids as SGLang records them (-1 = unused)."""
    rng = np.random.default_rng(seed)
    ids = np.full((TINY.num_hidden_layers, tokens, 8), -1, dtype=np.int32)
    for layer in TINY.moe_layer_ids:
        for t in range(tokens):
            ids[layer, t, : TINY.top_k] = rng.choice(NUM_PHYSICAL, TINY.top_k, replace=False)
    return ids


def expected_logical(physical: np.ndarray) -> np.ndarray:
    """[tokens, moe_layers, top_k] logical ids, mapped one element at a time."""
    _, tokens, _ = physical.shape
    out = np.full((tokens, TINY.num_moe_layers, TINY.top_k), -1, dtype=np.int64)
    for j, layer in enumerate(TINY.moe_layer_ids):
        for t in range(tokens):
            for k in range(TINY.top_k):
                slot = physical[layer, t, k]
                out[t, j, k] = -1 if slot < 0 else P2L[layer, slot]
    return out


def per_token_record(pass_id: int, mode: int, topk: np.ndarray) -> dict[str, Any]:
    tokens = topk.shape[1]
    count = np.zeros((TINY.num_hidden_layers, NUM_PHYSICAL), dtype=np.int32)
    for layer, t, k in zip(*np.nonzero(topk >= 0), strict=True):
        count[layer, topk[layer, t, k]] += 1
    return {
        "forward_pass_id": pass_id,
        "rank": 0,
        "gatherer_key": "primary",
        "input_ids": list(range(tokens)),
        "positions": list(range(tokens)),
        "extend_seq_lens": [tokens] if mode == EXTEND else None,
        "forward_mode": mode,
        "topk_ids_of_layer": torch.from_numpy(topk),
        "misc_objects": [],
        "global_physical_count": torch.from_numpy(count),
    }


def save_dump(path: Path, records: list[dict[str, Any]], p2l: np.ndarray = P2L) -> Path:
    torch.save({"records": records, "last_physical_to_logical_map": torch.from_numpy(p2l)}, path)
    return path


@pytest.fixture
def passes() -> list[tuple[int, np.ndarray]]:
    """(forward_mode, physical topk) of a small recording, in pass order."""
    return [
        (EXTEND, physical_topk(3, seed=1)),
        (DECODE, physical_topk(2, seed=2)),
        (IDLE, physical_topk(0, seed=3)),
        (MIXED, physical_topk(2, seed=4)),
        (DECODE, physical_topk(1, seed=5)),
    ]


def test_per_token_maps_physical_to_logical_and_splits_phases(
    tmp_path: Path, passes: list[tuple[int, np.ndarray]]
) -> None:
    path = save_dump(
        tmp_path / "expert_distribution_recorder_1.5_0.pt",
        [per_token_record(i, mode, topk) for i, (mode, topk) in enumerate(passes)],
    )
    source = read(path, TINY)
    assert source.granularity == "aggregate"
    assert source.provenance == {"importer": "sglang-recorder", "path": str(path)}
    [record] = list(source.records)
    assert record.request_id == "expert_distribution_recorder_1.5_0"

    want = {
        "prefill": expected_logical(passes[0][1]),
        "decode": np.concatenate([expected_logical(passes[1][1]), expected_logical(passes[4][1])]),
        "mixed": expected_logical(passes[3][1]),
    }
    assert record.tokens == {"prefill": 3, "decode": 3, "mixed": 2}
    assert set(record.token_ids) == set(want)
    for phase, ids in want.items():
        np.testing.assert_array_equal(record.token_ids[phase], ids)
        np.testing.assert_array_equal(record.counts[phase], expert_counts(ids, TINY.num_experts))
        assert record.counts[phase].sum() == record.tokens[phase] * 3 * TINY.top_k


def test_redundant_slot_counts_for_its_logical_expert(tmp_path: Path) -> None:
    topk = np.full((4, 2, 8), -1, dtype=np.int32)
    topk[1:, :, :2] = [[8, 0], [9, 5]]  # slot 8 copies slot 0's expert (layer 1: 7)
    path = save_dump(tmp_path / "d.pt", [per_token_record(0, DECODE, topk)])
    [record] = list(read(path, TINY).records)
    np.testing.assert_array_equal(record.token_ids["decode"][:, 0], [[7, 7], [3, 2]])
    counts = record.counts["decode"]
    assert counts[0, 7] == 2 and counts[0, 3] == 1 and counts[0, 2] == 1  # layer 1
    np.testing.assert_array_equal(record.token_ids["decode"][:, 1], [[2, 1], [2, 6]])  # layer 2


def test_directory_of_rank_files(tmp_path: Path, passes: list[tuple[int, np.ndarray]]) -> None:
    for rank in range(2):
        save_dump(tmp_path / f"rec_{rank}.pt", [per_token_record(0, *passes[rank])])
    (tmp_path / "notes.txt").write_text("not a dump")
    records = list(read(tmp_path, TINY).records)
    assert [r.request_id for r in records] == ["rec_0", "rec_1"]
    assert records[0].tokens == {"prefill": 3}
    assert records[1].tokens == {"decode": 2}


def test_per_pass_dump_uses_global_physical_count(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    counts = [rng.integers(0, 5, (4, NUM_PHYSICAL)).astype(np.int32) for _ in range(3)]
    for c in counts:
        c[0] = 0  # dense layer
    records = [
        {
            "forward_pass_id": i,
            "rank": 1,
            "gatherer_key": "primary",
            "global_physical_count": torch.from_numpy(c),
        }
        for i, c in enumerate(counts)
    ]
    path = save_dump(tmp_path / "pass.pt", records)
    [record] = list(read(path, TINY).records)

    total = sum(counts)
    want = np.zeros((TINY.num_moe_layers, TINY.num_experts), dtype=np.int64)
    for j, layer in enumerate(TINY.moe_layer_ids):
        for slot in range(NUM_PHYSICAL):
            want[j, P2L[layer, slot]] += total[layer, slot]
    assert set(record.counts) == {"mixed"}
    np.testing.assert_array_equal(record.counts["mixed"], want)
    assert record.tokens == {"mixed": round(want[0].sum() / TINY.top_k)}
    assert record.token_ids == {}


def test_store_round_trip(tmp_path: Path, passes: list[tuple[int, np.ndarray]]) -> None:
    path = save_dump(
        tmp_path / "dump.pt",
        [per_token_record(i, mode, topk) for i, (mode, topk) in enumerate(passes)],
    )
    source = read(path, TINY)
    [original] = list(read(path, TINY).records)
    with TraceWriter(
        tmp_path / "store",
        TINY,
        granularity=source.granularity,
        source=source.provenance,
        source_path=path,
    ) as writer:
        for record in source.records:
            writer.add(record)
    trace_set = TraceSet(tmp_path / "store")
    assert trace_set.granularity == "aggregate"
    [back] = list(trace_set.records())
    assert back.request_id == "dump"
    assert back.tokens == original.tokens
    for phase, counts in original.counts.items():
        np.testing.assert_array_equal(back.counts[phase], counts)
        np.testing.assert_array_equal(back.token_ids[phase], original.token_ids[phase])


def test_registry_detects_and_imports(tmp_path: Path, passes: list[tuple[int, np.ndarray]]) -> None:
    path = save_dump(tmp_path / "dump.pt", [per_token_record(0, *passes[0])])
    assert detect_pt_kind(path) == "sglang-recorder"
    assert detect_format(path) == "sglang-recorder"
    trace_set = import_traces(path, tmp_path / "store", model=TINY)
    assert trace_set.num_requests == 1


def test_load_pt_converts_tensors_recursively(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"a": torch.arange(3), "b": [{"c": torch.ones(2, 2)}, 5, None], "d": "s"}, path)
    data = load_pt(path)
    assert isinstance(data["a"], np.ndarray)
    np.testing.assert_array_equal(data["a"], [0, 1, 2])
    assert isinstance(data["b"][0]["c"], np.ndarray)
    assert data["b"][1:] == [5, None] and data["d"] == "s"


def test_default_model_is_deepseek_v3(tmp_path: Path) -> None:
    path = save_dump(tmp_path / "d.pt", [])
    assert read(path, None).model.name == "deepseek-v3"


def test_stat_dump_is_sent_to_sglang_stats(tmp_path: Path) -> None:
    path = tmp_path / "stat.pt"
    torch.save({"rank": 0, "logical_count": torch.zeros(2, 4, 8, dtype=torch.int32)}, path)
    assert detect_pt_kind(path) == "sglang-stats"
    with pytest.raises(InputError, match="--format sglang-stats"):
        list(read(path, TINY).records)


def _one_pass(mode: int = DECODE, tokens: int = 1, **changes: Any) -> list[dict[str, Any]]:
    record = per_token_record(7, mode, physical_topk(tokens, seed=0))
    record.update(changes)
    return [record]


def _per_pass(count: torch.Tensor) -> dict[str, Any]:
    return {"forward_pass_id": 1, "rank": 0, "global_physical_count": count}


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a torch file")


#: (content of bad.pt, expected message after "<path>: "). Content is a function that
#: writes the file, a (records, map) tuple, a list of records (saved with P2L), or any
#: other object, saved as it is.
BAD_DUMPS: list[tuple[Any, str]] = [
    (_garbage, "not a readable torch file"),
    ([1, 2], "expected a dict saved with torch.save, got list"),
    ({"x": 1}, "no 'records'"),
    ({"records": [], "last_physical_to_logical_map": torch.from_numpy(P2L)}, "non-empty list"),
    ({"records": _one_pass()}, "last_physical_to_logical_map is missing"),
    ((_one_pass(), P2L[:3]), "has 3 layers, model 'tiny' has 4"),
    ((_one_pass(), P2L + 1), "last_physical_to_logical_map: expert id 8 out of range [0, 8)"),
    (
        _one_pass(topk_ids_of_layer=torch.full((4, 1, 8), 10, dtype=torch.int32)),
        "record 0 (forward_pass_id 7): physical expert id 10 out of range [0, 10)",
    ),
    (
        _one_pass(topk_ids_of_layer=torch.zeros(3, 1, 8, dtype=torch.int32)),
        "topk_ids_of_layer has shape (3, 1, 8)",
    ),
    (_one_pass(topk_ids_of_layer=torch.zeros(4, 1, 8)), "must be an integer tensor"),
    (_one_pass(forward_mode=None), "forward_mode must be an integer"),
    (_one_pass(mode=IDLE, tokens=0), "no routed tokens"),
    (
        _one_pass() + [_per_pass(torch.zeros(4, NUM_PHYSICAL, dtype=torch.int32))],
        "mixes per_token records",
    ),
    ([_per_pass(torch.zeros(4, 9, dtype=torch.int32))], "global_physical_count has shape (4, 9)"),
    ([_per_pass(-torch.ones(4, NUM_PHYSICAL, dtype=torch.int32))], "is negative"),
]


@pytest.mark.parametrize(("content", "message"), BAD_DUMPS)
def test_errors_name_the_file(tmp_path: Path, content: Any, message: str) -> None:
    path = tmp_path / "bad.pt"
    if callable(content):
        content(path)
    elif isinstance(content, tuple):
        save_dump(path, *content)
    elif isinstance(content, list) and content and isinstance(content[0], dict):
        save_dump(path, content)
    else:
        torch.save(content, path)
    with pytest.raises(InputError) as info:
        list(read(path, TINY).records)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_path_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read(tmp_path / "missing.pt", TINY)
    with pytest.raises(InputError, match="no .pt files"):
        read(tmp_path, TINY)
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(InputError, match=r"junk\.pt: not a readable torch file"):
        detect_pt_kind(tmp_path / "junk.pt")
    with pytest.raises(InputError, match="not an SGLang expert-distribution dump"):
        torch.save({"other": 1}, tmp_path / "other.pt")
        detect_pt_kind(tmp_path / "other.pt")


def test_missing_torch_raises_missing_dependency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_dump(tmp_path / "d.pt", [])
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingDependencyError) as info:
        load_pt(path)
    assert str(info.value) == TORCH_MISSING
    assert "pip install torch==2.13.0" in TORCH_MISSING
    with pytest.raises(MissingDependencyError):
        read(path, TINY)  # before any record is read
