import gzip
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from scheduler.cli import main
from scheduler.prediction.bundle import load_bundle
from scheduler.prediction.clusters import ActivationClusters
from scheduler.prediction.datasets import load_routing
from scheduler.prediction.text_classifier import TextClassifier
from scheduler.prediction.text_cluster import TextClusterClassifier
from scheduler.prediction.text_features import HashedTfidf
from scheduler.profile import load_profile
from scheduler.traces.importers import open_traces
from tests.conftest import labelled_records, write_store
from tests.prediction_data import labelled_prompts, write_esft_like, write_prompt_dir


@pytest.fixture
def data_dir(tmp_path):
    return write_prompt_dir(tmp_path / "data", per_domain=40)


@pytest.fixture
def model_file(tmp_path, tiny_model):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_model.to_dict()))
    return path


def _requests(path, texts, gz=False):
    rows = "".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in enumerate(texts))
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(rows)
    else:
        path.write_text(rows)
    return path


def test_fit_then_classify_with_single_pass_traces(data_dir, model_file, tmp_path, capsys):
    esft = write_esft_like(tmp_path / "esft", _tiny(model_file), sequences=12)
    out = tmp_path / "b.npz"
    args = ["fit", "--data", str(data_dir), "--traces", str(esft), "--model", str(model_file)]
    args += ["--out", str(out), "--report", str(tmp_path / "r.json")]
    args += ["--profile-out", str(tmp_path / "p.json")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "domain classifier: macro-F1" in printed and "early-late proxy" in printed
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["domain"]["macro_f1"] > 0.9 and report["domain"]["test"] > 0
    routing = report["routing"]
    assert routing["pairs"].startswith("early-late proxy")
    assert routing["clusters"]["held_out"]["selected"]["hot_set"] > 0
    pd = routing["prefill_decode"]
    assert set(pd["held_out"]) == {"prefill", "prior", "ridge_unblended", "ridge"}
    assert pd["blend_n0"] >= 0 and pd["held_out_by_prefill_length"]["ridge"]
    assert "skipped" in routing["text_cluster"]  # no prompts in ESFT-like traces
    bundle = load_bundle(out)
    assert bundle.model == _tiny(model_file) and bundle.text_cluster is None
    assert bundle.metadata["training_data"]["prompts"]["files"]
    profile = load_profile(tmp_path / "p.json")
    assert sum(c.requests for c in profile.classes.values()) == 24

    requests = _requests(tmp_path / "in.jsonl.gz", labelled_prompts(3, seed=8)[0], gz=True)
    assert main(["classify", "--bundle", str(out), "--input", str(requests)]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["id"] for r in rows] == list(range(12))
    assert [r["domain"] for r in rows] == ["code"] * 3 + ["math"] * 3 + ["chat"] * 3 + [
        "general"
    ] * 3
    assert all(0 < r["probability"] <= 1 and "cluster" not in r for r in rows)
    assert "domain mix vs the training reference" in captured.err


def _tiny(model_file):
    from scheduler.model_shape import resolve_model

    return resolve_model(str(model_file))


def test_fit_with_prompted_traces_gives_clusters_to_classify(data_dir, tmp_path, tiny_model):
    store = write_store(tmp_path / "s", tiny_model, labelled_records(tiny_model, per_class=10))
    out = tmp_path / "b.npz"
    assert main(["fit", "--data", str(data_dir), "--traces", str(store), "--out", str(out)]) == 0
    bundle = load_bundle(out, model=tiny_model)
    assert bundle.text_cluster is not None
    requests = _requests(tmp_path / "in.jsonl", ["prompt code 99", "prompt math 99"])
    result = tmp_path / "out.jsonl"
    assert (
        main(["classify", "--bundle", str(out), "--input", str(requests), "--output", str(result)])
        == 0
    )
    rows = [json.loads(line) for line in result.read_text().splitlines()]
    assert all(
        {"id", "domain", "probability", "cluster", "cluster_probability"} <= set(r) for r in rows
    )
    assert rows[0]["cluster"] != rows[1]["cluster"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fit", "--nodes", "3"], "--nodes 3 must divide the 8 experts"),
        (["fit", "--clusters", "9"], "--clusters must be in"),
        (["fit", "--prefill-fraction", "1.5"], "--prefill-fraction"),
        (["fit", "--traces", "missing-dir"], "missing-dir: does not exist"),
        (["classify", "--input", "in.jsonl"], "does not exist"),
    ],
)
def test_errors_are_one_line(data_dir, model_file, tmp_path, capsys, argv, message, monkeypatch):
    esft = write_esft_like(tmp_path / "esft", _tiny(model_file), sequences=12)
    monkeypatch.chdir(tmp_path)
    if argv[0] == "fit":
        argv = [*argv, "--data", str(data_dir), "--out", "b.npz", "--model", str(model_file)]
        if "--traces" not in argv:
            argv += ["--traces", str(esft)]
    else:
        argv = [*argv, "--bundle", "nothing.npz"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("moe-scheduler: error:")
    assert not (tmp_path / "b.npz").exists()


def test_classify_rejects_bad_rows(data_dir, tmp_path, capsys):
    out = tmp_path / "b.npz"
    assert (
        main(
            ["fit", "--data", str(data_dir), "--traces", str(tmp_path / "none"), "--out", str(out)]
        )
        == 2
    )
    assert main(["fit", "--data", str(data_dir), "--out", str(out)]) == 0  # no DATA/traces: skipped
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "ok"}\n{"id": 2}\n')
    assert (
        main(
            [
                "classify",
                "--bundle",
                str(out),
                "--input",
                str(bad),
                "--output",
                str(tmp_path / "o.jsonl"),
            ]
        )
        == 2
    )
    assert "bad.jsonl: line 2: 'prompt' must be a string" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_real_data_fit_and_classify(shared_data, tmp_path, capsys):
    """Real prompts (subsampled) and the real ESFT traces, end to end."""
    out = tmp_path / "b.npz"
    argv = ["fit", "--data", str(shared_data), "--max-prompts", "1500", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "activation clusters (deepseek-v2-lite" in printed
    bundle = load_bundle(out)
    scores = bundle.metadata["scores"]
    assert scores["domain"]["macro_f1"] > 0.8  # 1,200 training prompts only
    assert scores["routing"]["requests"] == 213
    held = scores["routing"]["clusters"]["held_out"]
    assert held["selected"]["hot_set"] > held["one_cluster"]["hot_set"] > held["uniform"]
    math_file = shared_data / "prompts" / "math" / "math_prompts.jsonl.gz"
    with gzip.open(math_file, "rt", encoding="utf-8") as f:
        texts = [json.loads(next(f))["prompt"] for _ in range(20)]
    requests = _requests(tmp_path / "math.jsonl", texts)
    assert main(["classify", "--bundle", str(out), "--input", str(requests)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 20 and sum(r["domain"] == "math" for r in rows) >= 18


def test_real_mixtral_pairs_train_text_to_cluster(shared_data):
    """The Mixtral sample has prompt text with its routing: real (prompt, routed experts)
    pairs, only five, so this checks the path, not the quality."""
    with tempfile.TemporaryDirectory() as tmp:
        traces = open_traces(shared_data / "traces" / "mixtral-humaneval-gsm8k-small", Path(tmp))
        routing = load_routing(traces)
    assert all(p for p in routing.prompts)
    clusters = ActivationClusters(2).fit(routing.counts)
    texts = np.array(routing.prompts, dtype=object)
    features = HashedTfidf(word_bits=12, char_bits=14).fit(texts)
    model = TextClusterClassifier(clusters, text=TextClassifier(features=features))
    model.fit(texts, routing.counts)
    assert set(model.predict(texts).tolist()) <= {0, 1}


def test_fit_refuses_aggregate_statistics(data_dir, model_file, tmp_path, capsys):
    stats = tmp_path / "stats"
    stats.mkdir()
    counts = [[0] * 8] + [[5, 1, 1, 1, 1, 1, 1, 1]] * 3
    (stats / "decode_in1out1.json").write_text(json.dumps({"logical_count": counts}))
    argv = ["fit", "--data", str(data_dir), "--traces", str(stats), "--model", str(model_file)]
    assert main([*argv, "--out", str(tmp_path / "b.npz")]) == 2
    assert "not per-request routing" in capsys.readouterr().err
