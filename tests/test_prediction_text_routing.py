"""Text -> routing: fit on (prompt, routed experts) pairs, held-out figures against the
baselines, learning curve, clear skips; the feedback buffer's measured-routing rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scheduler.cli import main
from scheduler.model_shape import PRESETS, ModelShape
from scheduler.prediction.bundle import load_bundle
from scheduler.prediction.pair_buffer import decode_routing, encode_routing, read_pairs, row_bytes
from scheduler.traces.store import RequestTrace
from tests.conftest import write_store
from tests.prediction_data import VOCAB, prompts, write_prompt_dir

TOP1 = ModelShape("top1", 3, (0, 1, 2), 8, 1, 16)
#: dense layer 0, MoE layers 1 and 3 (interleaved), 32 experts, top-8
TOP8 = ModelShape("top8", 4, (1, 3), 32, 8, 16)


def _ids(rng: np.random.Generator, model: ModelShape, group: int, groups: int, tokens: int):
    e = model.num_experts
    w = np.full(e, 0.3)
    w[group * e // groups : (group + 1) * e // groups] = 4.0
    w /= w.sum()
    out = np.empty((tokens, model.num_moe_layers, model.top_k), dtype=np.int16)
    for t in range(tokens):
        for layer in range(model.num_moe_layers):
            out[t, layer] = rng.choice(e, model.top_k, replace=False, p=w)
    return out


def pair_records(model: ModelShape, per_group: int, groups: int = 2, seed: int = 0):
    """Requests whose prompt domain decides which experts their tokens favour."""
    rng = np.random.default_rng(seed)
    domains = list(VOCAB)[:groups]
    records = []
    for g, domain in enumerate(domains):
        for i, text in enumerate(prompts(domain, per_group, seed)):
            ids = {
                "prefill": _ids(rng, model, g, groups, 4),
                "decode": _ids(rng, model, g, groups, 3),
            }
            records.append(
                RequestTrace.from_token_ids(
                    f"{domain}-{i}", ids, model.num_experts, prompt=text, label=domain
                )
            )
    return records


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_prompt_dir(tmp_path_factory.mktemp("d") / "data", per_domain=30)


def _fit(data_dir: Path, traces: Path, tmp: Path, *extra: str) -> dict:
    report = tmp / "r.json"
    argv = ["fit", "--data", str(data_dir), "--traces", str(traces), "--out", str(tmp / "b.npz")]
    assert main([*argv, "--report", str(report), "--nodes", "2", *extra]) == 0
    return json.loads(report.read_text())["routing"]["text_cluster"]


@pytest.mark.parametrize("model", [TOP1, TOP8], ids=["top1", "top8"])
def test_fit_reports_held_out_figures_baselines_and_curve(data_dir, tmp_path, model, capsys):
    store = write_store(tmp_path / "s", model, pair_records(model, 20))
    tc = _fit(data_dir, store, tmp_path, "--clusters", "2")
    held = tc["held_out"]
    assert held["test_pairs"] > 0 and held["train_pairs"] == tc["train_pairs"]
    for name in ("text_cluster", "class_map", "one_cluster", "true_cluster"):
        assert {"accuracy", "pearson", "locality"} <= set(held[name])
        assert 0 <= held[name]["locality"] <= 1
    assert set(tc["baselines"]) == {"one_cluster", "class_map"}
    curve = tc["learning_curve"]
    assert [r["pairs"] for r in curve] == [25, tc["train_pairs"]]
    assert curve[0]["runs"] == tc["learning_curve_seeds"] and curve[-1]["runs"] == 1
    assert tc["text_predictor"]["use"] in ("text_cluster", "class_map")
    out = capsys.readouterr().out
    assert "text -> routing predictors" in out and "text mode will use" in out
    bundle = load_bundle(tmp_path / "b.npz", model=model)
    assert bundle.metadata["text_predictor"] == tc["text_predictor"]


def test_few_pairs_or_one_cluster_skip_clearly(data_dir, tmp_path, capsys):
    store = write_store(tmp_path / "few", TOP1, pair_records(TOP1, 1))
    tc = _fit(data_dir, store, tmp_path / "a")
    assert "need at least" in tc["skipped"] and tc["text_predictor"]["use"] == "class_map"
    # every request routed identically: one cluster
    same = [
        RequestTrace.from_token_ids(f"r{i}", {"decode": np.zeros((3, 3, 1), np.int16)}, 8, prompt=t)
        for i, t in enumerate(prompts("code", 12) + prompts("math", 12))
    ]
    store = write_store(tmp_path / "one", TOP1, same)
    tc = _fit(data_dir, store, tmp_path / "b")
    assert "1 cluster(s)" in tc["skipped"]
    assert "text -> routing predictors: skipped" in capsys.readouterr().out


def test_buffer_routing_round_trips_and_is_small():
    model = PRESETS["deepseek-v3"]
    rng = np.random.default_rng(0)
    counts = np.zeros((model.num_moe_layers, model.num_experts))
    for layer in range(model.num_moe_layers):  # 300 tokens, top-8, skewed
        p = rng.dirichlet(np.full(model.num_experts, 0.3))
        for _ in range(300):
            counts[layer, rng.choice(model.num_experts, 8, replace=False, p=p)] += 1
    routing = encode_routing(counts, "decode")
    back = decode_routing(json.loads(json.dumps(routing)), model)
    assert np.array_equal(back > 0, counts > 0)
    assert np.allclose(back.sum(axis=1), counts.sum(axis=1))
    top = counts.max(axis=1, keepdims=True)
    assert np.abs(
        back / back.sum(1, keepdims=True) - counts / counts.sum(1, keepdims=True)
    ).max() < ((top / counts.sum(axis=1, keepdims=True)).max() / 255)
    assert row_bytes({"prompt": "", "class": "x", "routing": routing}) < 16_000
    with pytest.raises(ValueError, match="the model"):
        decode_routing(routing, PRESETS["deepseek-v2-lite"])


def test_feedback_buffer_rows_feed_fit_pairs(data_dir, tmp_path, capsys):
    from scheduler.server.feedback import Feedback, write
    from scheduler.server.telemetry import Observation

    class _Cluster:
        model = TOP1
        version = "test"

        class topology:  # noqa: N801
            gpus_per_node = 1

    fb = Feedback(_Cluster(), buffer_size=100)  # type: ignore[arg-type]
    for r in pair_records(TOP1, 20):
        obs = Observation(1, 0, 0, 1.0, 0, r.counts["prefill"], r.counts["decode"])
        fb.record(obs, "law", 0, r.prompt or "", predicted=True)
    _, rows = fb.snapshot()
    assert rows[0]["class"] == "law" and rows[0]["routing"]["phase"] == "decode"
    write(tmp_path / "fb", None, rows)
    buffer = tmp_path / "fb" / "buffer.jsonl"
    texts, phases, counts = read_pairs(buffer, TOP1)
    assert len(texts) == 40 and phases[0] == "decode"
    assert np.allclose(counts.sum(axis=(1, 2)), 3 * TOP1.num_moe_layers)  # 3 decode tokens
    model_file = tmp_path / "top1.json"
    model_file.write_text(json.dumps(TOP1.to_dict()))
    report = tmp_path / "r.json"
    argv = ["fit", "--data", str(data_dir), "--pairs", str(buffer), "--model", str(model_file)]
    argv += ["--out", str(tmp_path / "b.npz"), "--report", str(report), "--nodes", "2"]
    assert main(argv) == 0
    tc = json.loads(report.read_text())["routing"]["text_cluster"]
    assert tc["held_out"]["test_pairs"] > 0 and "learning_curve" in tc
    assert main([*argv[:-4], "--traces", str(buffer), "--out", str(tmp_path / "c.npz")]) == 2
    assert "--traces or --pairs" in capsys.readouterr().err
