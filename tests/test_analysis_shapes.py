"""Every model shape the importers accept goes through profile / analyze / fit / place.

``analyze`` once died (``ValueError: All-NaN slice encountered``) on a real
128-expert top-1 trace with MoE every other layer. These tests build tiny stores of many
shapes (top-1 to top-8, 8 to 256 experts, dense/MoE interleaving, one class, one
request, a single-token class, a hot expert taking every token of a layer) and run the
commands on them; ``filterwarnings = error`` makes any numpy warning a failure too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from scheduler.analysis.collect import from_traces
from scheduler.analysis.report import write_report
from scheduler.cli import main
from scheduler.model_shape import ModelShape
from scheduler.traces.importers.sglang_generate import encode_routed_experts
from scheduler.traces.store import RequestTrace, TraceSet
from tests.conftest import random_token_ids, write_store
from tests.prediction_data import write_prompt_dir

TOPOLOGY = "[cluster]\nnodes = 2\ngpus_per_node = 2\n"


@dataclass(frozen=True)
class Case:
    """A model shape and the records to store for it."""

    id: str
    model: ModelShape
    classes: tuple[str, ...] = ("code", "math")
    per_class: int = 2
    prefill_tokens: int = 3
    decode_tokens: int = 2
    hot_layer: int | None = None  # MoE layer index where expert 0 takes every token
    single_token_class: bool = False  # one more class holding one decode token
    via_generate: bool = False  # imported from SGLang /generate JSON lines

    @property
    def redundant(self) -> int:
        """Redundant slots so that experts + redundant divide the 4 GPUs."""
        return 4 - self.model.num_experts % 4


def _every_other(name: str, layers: int, experts: int, top_k: int) -> ModelShape:
    return ModelShape(name, layers, tuple(range(1, layers, 2)), experts, top_k, 16)


def _dense_first(name: str, layers: int, dense: int, experts: int, top_k: int) -> ModelShape:
    return ModelShape(name, layers, tuple(range(dense, layers)), experts, top_k, 16)


CASES = [
    # The shape of the issue: 48 layers, MoE every other one, 128 experts, top-1,
    # imported from /generate responses with a JSON model file.
    Case("top1-128e-every-other-generate", _every_other("t1", 48, 128, 1), via_generate=True),
    Case("top2-8e-dense-first-hot-expert", _dense_first("t2", 4, 1, 8, 2), hot_layer=1),
    Case("top4-64e-every-other-one-class", _every_other("t4", 8, 64, 4), classes=("only",)),
    Case("top6-160e-one-request", _dense_first("t6", 3, 1, 160, 6), classes=("x",), per_class=1),
    Case(
        "top8-256e-dense-first-single-token-class-hot",
        _dense_first("t8", 5, 3, 256, 8),
        hot_layer=0,
        single_token_class=True,
    ),
    Case("top8-8e-every-expert-every-token", _every_other("t8e8", 4, 8, 8)),
]


def _ids(rng: np.random.Generator, tokens: int, case: Case) -> np.ndarray:
    ids = random_token_ids(rng, tokens, case.model)
    if case.hot_layer is not None:
        # expert 0 in every token's top-k of that layer, the other slots distinct from it
        others = np.arange(1, case.model.num_experts)
        for t in range(tokens):
            ids[t, case.hot_layer, 0] = 0
            ids[t, case.hot_layer, 1:] = rng.choice(others, case.model.top_k - 1, replace=False)
    return ids


def records(case: Case, seed: int = 0) -> list[RequestTrace]:
    rng = np.random.default_rng(seed)
    out = []
    e = case.model.num_experts
    for label in case.classes:
        for i in range(case.per_class):
            phases = {
                "prefill": _ids(rng, case.prefill_tokens, case),
                "decode": _ids(rng, case.decode_tokens, case),
            }
            out.append(
                RequestTrace.from_token_ids(
                    f"{label}-{i}", phases, e, label=label, prompt=f"prompt {label} {i}"
                )
            )
    if case.single_token_class:
        out.append(
            RequestTrace.from_token_ids(
                "lone-0", {"decode": _ids(rng, 1, case)}, e, label="lone", prompt="prompt lone"
            )
        )
    return out


def _write_generate(path: Path, case: Case, seed: int = 0) -> Path:
    """SGLang /generate responses (routing over every hidden layer, dense ones zero)."""
    rng = np.random.default_rng(seed)
    m = case.model
    rows = []
    for label in case.classes:
        for i in range(case.per_class):
            prompt, completion = case.prefill_tokens, case.decode_tokens
            full = np.zeros((prompt + completion - 1, m.num_hidden_layers, m.top_k), np.int32)
            full[:, list(m.moe_layer_ids)] = _ids(rng, len(full), case)
            meta = {
                "id": f"{label}-{i}",
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "routed_experts": encode_routed_experts(full),
            }
            rows.append(json.dumps({"text": "out", "meta_info": meta}))
    path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    return path


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert code == 0, f"moe-scheduler {' '.join(argv)} -> {code}\n{captured.err}"
    return captured.out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_prompt_dir(tmp_path_factory.mktemp("data"), per_domain=12)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_commands_on_shape(
    case: Case, tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if case.via_generate:
        model_file = tmp_path / "model.json"
        model_file.write_text(json.dumps(case.model.to_dict()))
        raw = _write_generate(tmp_path / "generate.jsonl", case)
        store = tmp_path / "store"
        model_args = ["--format", "sglang-generate", "--model", str(model_file)]
        _run(capsys, ["import", str(raw), "--out", str(store), *model_args])
        assert TraceSet(store).model == case.model
    else:
        store = write_store(tmp_path / "store", case.model, records(case))

    profile = tmp_path / "p.json"
    by = ["--by", "cluster", "--k", "2"] if case.via_generate else []  # /generate: no labels
    _run(capsys, ["profile", str(store), "--out", str(profile), *by])
    _run(capsys, ["profile", "--check", str(profile)])

    report = tmp_path / "report.md"
    _run(capsys, ["analyze", str(store), str(profile), "--out", str(report)])
    text = report.read_text(encoding="utf-8")
    assert "## Summary" in text and text.count("### Co-activation") == 2
    if case.model.top_k == 1:
        assert "undefined for top-1 routing" in text
    for link in text.split("](")[1:]:  # every figure linked exists
        assert (tmp_path / link.split(")")[0]).is_file()

    bundle = tmp_path / "b.npz"
    fit = ["fit", "--data", str(data_dir), "--traces", str(store), "--out", str(bundle)]
    _run(capsys, [*fit, "--nodes", "4", "--max-prompts", "40"])
    assert bundle.is_file()

    topology = tmp_path / "topology.toml"
    topology.write_text(TOPOLOGY)
    placement = tmp_path / "placement"
    place = ["place", "--profile", str(profile), "--topology", str(topology)]
    place += ["--redundant-experts", str(case.redundant), "--time-limit", "1"]
    _run(capsys, [*place, "--out", str(placement)])
    _run(capsys, ["place", "--check", str(placement), "--profile", str(profile), *place[3:5]])


def _random_shape(rng: np.random.Generator, draw: int) -> ModelShape:
    experts = int(rng.choice([8, 16, 60, 64, 128, 160, 256]))
    top_k = int(rng.integers(1, min(8, experts) + 1))
    layers = int(rng.integers(1, 9))
    moe = np.sort(rng.choice(layers, int(rng.integers(1, layers + 1)), replace=False))
    return ModelShape(f"random-{draw}", layers, tuple(int(i) for i in moe), experts, top_k, 8)


@pytest.mark.parametrize("draw", range(10))
def test_analysis_of_random_shapes(draw: int, tmp_path: Path) -> None:
    """Random shapes, class counts, request counts and phases through collect + report."""
    rng = np.random.default_rng(1000 + draw)
    model = _random_shape(rng, draw)
    records = []
    for c in range(int(rng.integers(1, 4))):
        for i in range(int(rng.integers(1, 4))):
            phases = [p for p in ("prefill", "decode") if rng.random() < 0.6] or ["decode"]
            ids = {p: random_token_ids(rng, int(rng.integers(1, 4)), model) for p in phases}
            records.append(
                RequestTrace.from_token_ids(f"r{c}-{i}", ids, model.num_experts, label=f"c{c}")
            )
    store = write_store(tmp_path / "store", model, records)
    ds = from_traces("random", TraceSet(store))
    out = tmp_path / "report.md"
    write_report([ds], out, "test")
    text = out.read_text(encoding="utf-8")
    assert f"top-{model.top_k}" in text and "Traceback" not in text


def test_stats_edge_cases() -> None:
    """The statistics say nan (n/a) where a value is undefined, without numpy warnings."""
    from scheduler.analysis import stats

    empty = np.zeros((2, 4))
    assert stats.hottest_experts(empty, 5) == []
    assert len(stats.hottest_experts(np.array([[3.0, 0, 0, 0]]), 5)) == 1
    js = stats.js_divergence(np.array([[1.0, 0], [0, 0]]), np.array([[0.0, 1], [1, 0]]))
    assert js[0] == pytest.approx(1.0) and np.isnan(js[1])
    assert np.isnan(stats.finite_mean(np.array([np.nan, np.inf])))
    assert stats.finite_mean(np.array([[1.0, np.nan], [3.0, np.nan]]), axis=0)[0] == 2.0
    top1 = stats.coactivation(np.array([[[0]], [[1]]]), 4)
    assert np.isnan(stats.top_pair_share(top1)).all()


def test_clusters_of_identical_requests_leave_extra_clusters_empty() -> None:
    from scheduler.prediction.clusters import ActivationClusters

    counts = np.ones((5, 2, 8))  # every request the same (top-k = experts)
    model = ActivationClusters(3).fit(counts)
    assert model.centers_.shape[0] == 3 and set(model.predict(counts).tolist()) == {0}
    assert model.weights_.tolist() == [1.0, 0.0, 0.0]
