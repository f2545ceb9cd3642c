"""Importers of the real datasets' formats: small fixtures built here, then the real data."""

import json
import lzma

import numpy as np
import pytest

from scheduler.errors import InputError
from scheduler.model_shape import PRESETS
from scheduler.traces.importers import detect_format, esft, mixtral_jsonl, sglang_stats


# ----------------------------------------------------------------------------- ESFT npz
def _esft_file(path, model, seq_lens=(3, 2), rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    total = sum(seq_lens)
    ids = np.stack(
        [
            np.stack(
                [
                    rng.choice(model.num_experts, model.top_k, replace=False)
                    for _ in range(model.num_moe_layers)
                ]
            )
            for _ in range(total)
        ]
    ).astype(np.int8)
    np.savez(
        path,
        expert_ids=ids,
        gate_weights=np.full(ids.shape, 0.1, np.float32),
        seq_offsets=np.concatenate([[0], np.cumsum(seq_lens)]).astype(np.int32),
        moe_layer_ids=np.array(model.moe_layer_ids, np.int16),
    )
    return ids


def test_esft_one_record_per_sequence(tmp_path, tiny_model):
    ids = _esft_file(tmp_path / "esft_law.npz", tiny_model)
    _esft_file(tmp_path / "esft_intent.npz", tiny_model, (1,))
    assert detect_format(tmp_path) == "esft"
    records = list(esft.read(tmp_path, tiny_model).records)
    assert [(r.request_id, r.label) for r in records] == [
        ("intent/0", "intent"),
        ("law/0", "law"),
        ("law/1", "law"),
    ]
    law0 = records[1]
    assert law0.tokens == {"prefill": 3}
    assert np.array_equal(law0.token_ids["prefill"], ids[:3])
    assert law0.counts["prefill"].sum() == 3 * tiny_model.num_moe_layers * tiny_model.top_k


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(expert_ids=d["expert_ids"][:, :2]), "expert_ids has shape"),
        (lambda d: d["expert_ids"].__setitem__((0, 0, 0), 8), "out of range"),
        (lambda d: d.update(seq_offsets=np.array([0, 2, 9])), "seq_offsets"),
        (lambda d: d.pop("seq_offsets"), "missing array"),
    ],
)
def test_esft_bad_input(tmp_path, tiny_model, mutate, message):
    path = tmp_path / "esft_x.npz"
    _esft_file(path, tiny_model)
    with np.load(path) as z:
        data = {k: z[k] for k in z.files}
    mutate(data)
    data.pop("gate_weights")
    np.savez(path, **data)
    with pytest.raises(InputError, match=message) as err:
        list(esft.read(path, tiny_model).records)
    assert str(path) in str(err.value)


def test_esft_truncated_file(tmp_path, tiny_model):
    path = tmp_path / "esft_x.npz"
    _esft_file(path, tiny_model)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(InputError, match="esft_x.npz: not a readable .npz"):
        list(esft.read(path, tiny_model).records)


# ------------------------------------------------------------------ SGLang statistics JSON
def test_sglang_stats_pairs_phases_and_drops_dense_rows(tmp_path, tiny_model):
    def write(name, rows):
        (tmp_path / name).write_text(json.dumps({"logical_count": rows}))

    dense = [0.0] * 8
    write("prefill_w1.json", [dense] + [[2.0] * 8] * 3)
    write("decode_w1.json", [dense] + [[4.0, 0, 0, 0, 0, 0, 0, 4.0]] * 3)
    write("prefill_w2.json", [[[1.0] * 8] * 4, [[1.0] * 8] * 4])  # [passes, layers, experts]
    assert detect_format(tmp_path) == "sglang-stats"
    source = sglang_stats.read(tmp_path, tiny_model)
    assert source.granularity == "aggregate"
    w1, w2 = sorted(source.records, key=lambda r: r.request_id)
    assert set(w1.counts) == {"prefill", "decode"} and w1.label == "w1"
    assert w1.counts["decode"].shape == (3, 8) and w1.tokens == {"prefill": 8, "decode": 4}
    assert w2.counts["prefill"].tolist() == [[2] * 8] * 3


@pytest.mark.parametrize(
    "content, message",
    [
        ("{oops", "not valid JSON"),
        (json.dumps({"other": 1}), "no 'logical_count'"),
        (json.dumps({"logical_count": [[1.0] * 8] * 3}), "has shape"),
        (json.dumps({"logical_count": [[-1.0] * 8] * 4}), "negative"),
        (json.dumps({"logical_count": [[0.5] * 8] * 4}), "non-integer"),
    ],
)
def test_sglang_stats_bad_input(tmp_path, tiny_model, content, message):
    path = tmp_path / "decode_x.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as err:
        list(sglang_stats.read(path, tiny_model).records)
    assert str(path) in str(err.value)


# ------------------------------------------------------------------ Mixtral JSON lines
def _write_xz(path, rows):
    with lzma.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_mixtral_prefill_then_decode_steps_stay_aligned(tmp_path, tiny_model):
    m = tiny_model
    rows = []
    for layer in range(m.num_moe_layers):  # prefill: 3 tokens, layer 1 drops token 1
        for pos in range(3):
            if not (layer == 1 and pos == 1):
                rows.append(
                    {
                        "dataset": "humaneval",
                        "problem_id": 0,
                        "layer": layer,
                        "token_pos": pos,
                        "experts": [layer, pos + 3],
                        "gating_probs": [0.6, 0.4],
                    }
                )
    for step in range(2):  # decode: 2 steps, step 0 drops layer 2
        for layer in range(m.num_moe_layers):
            if not (step == 0 and layer == 2):
                rows.append(
                    {
                        "dataset": "humaneval",
                        "problem_id": 0,
                        "layer": layer,
                        "token_pos": 0,
                        "experts": [7, step],
                        "gating_probs": [0.7, 0.3],
                    }
                )
    _write_xz(tmp_path / "humaneval_p0_prefill_decode_routing_raw.jsonl.xz", rows)
    _write_xz(
        tmp_path / "gsm8k_2_decode_routing.jsonl.xz",
        [
            {
                "dataset": "gsm8k",
                "problem_id": 1,
                "layer": layer,
                "token_idx": t,
                "experts": [1, 2],
                "gating_probs": [0.5, 0.5],
            }
            for layer in range(m.num_moe_layers)
            for t in range(4)
        ],
    )
    _write_xz(
        tmp_path / "gsm8k_1_mixtral_outputs.jsonl.xz",
        [{"problem_id": 1, "task_id": "gsm8k_1", "prompt": "How many?", "generated": "2"}],
    )
    assert detect_format(tmp_path) == "mixtral-jsonl"

    raw, dec = sorted(mixtral_jsonl.read(tmp_path, m).records, key=lambda r: r.label)
    assert (raw.request_id, raw.label) == ("humaneval/0/prefill+decode", "code")
    pre, de = raw.token_ids["prefill"], raw.token_ids["decode"]
    assert pre.shape == (3, 3, 2) and de.shape == (2, 3, 2)
    assert pre[1, 1].tolist() == [-1, -1] and pre[2, 1].tolist() == [1, 5]
    assert de[0, 2].tolist() == [-1, -1] and de[1, 2].tolist() == [7, 1]
    assert raw.tokens == {"prefill": 3, "decode": 2}
    assert (dec.request_id, dec.label, dec.prompt) == ("gsm8k/1", "math", "How many?")
    assert set(dec.counts) == {"decode"} and dec.counts["decode"][0].tolist()[1:3] == [4, 4]


def test_mixtral_bad_lines(tmp_path, tiny_model):
    path = tmp_path / "x_routing.jsonl"
    path.write_text(
        '{"dataset": "d", "problem_id": 0, "layer": 0, "token_idx": 0, "experts": [1, 99]}\n'
    )
    with pytest.raises(InputError, match="line 1: expert id 99 out of range"):
        list(mixtral_jsonl.read(path, tiny_model).records)
    path.write_text("not json\n")
    with pytest.raises(InputError, match="x_routing.jsonl: line 1: not valid JSON"):
        list(mixtral_jsonl.read(path, tiny_model).records)
    broken = tmp_path / "y_routing.jsonl.xz"
    _write_xz(broken, [{"a": 1}] * 100)
    broken.write_bytes(broken.read_bytes()[:40])
    with pytest.raises(InputError, match="y_routing.jsonl.xz: line 1: cannot read"):
        list(mixtral_jsonl.read(broken, tiny_model).records)


# ----------------------------------------------------------------------------- real data
def test_real_esft(shared_data):
    records = list(esft.read(shared_data / "traces/esft-deepseek-v2-lite", None).records)
    by_label = {}
    for r in records:
        by_label[r.label] = by_label.get(r.label, 0) + 1
    assert by_label == {"intent": 127, "law": 33, "summary": 13, "translation": 40}
    assert sum(r.tokens["prefill"] for r in records) == 33279


def test_real_sglang_stats_match_published_figures(shared_data):
    """The dataset README's own figures: decode_in1000out1000 imbalance 5.56, and mean
    per-layer Pearson 0.66 between its prefill and decode statistics."""
    from scheduler.analysis.stats import load_imbalance, pearson_per_layer

    records = {
        r.request_id: r
        for r in sglang_stats.read(
            shared_data / "traces/sglang-deepseek-v3-eplb-stats", None
        ).records
    }
    assert len(records) == 8
    w = records["in1000out1000"]
    assert w.tokens["decode"] == 18_413_568
    assert load_imbalance(w.counts["decode"]).mean() == pytest.approx(5.56, abs=0.01)
    r = pearson_per_layer(w.counts["prefill"].astype(float), w.counts["decode"].astype(float))
    assert r.mean() == pytest.approx(0.66, abs=0.01)


def test_real_mixtral(shared_data):
    records = list(
        mixtral_jsonl.read(
            shared_data / "traces/mixtral-humaneval-gsm8k-small", PRESETS["mixtral-8x7b"]
        ).records
    )
    assert len(records) == 5
    raw = next(r for r in records if "prefill" in r.counts)
    assert raw.tokens == {"prefill": 135, "decode": 83}
    assert raw.prompt and raw.prompt.startswith("from typing import List")
    assert sorted(r.label for r in records) == ["code", "code", "code", "math", "math"]
