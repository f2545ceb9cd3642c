import json
import subprocess
import sys

import numpy as np
import pytest

from scheduler.cli import build_parser, main
from scheduler.profile import load_profile
from scheduler.traces.store import TraceSet
from tests.conftest import labelled_records, write_store

SUBCOMMANDS = [
    name
    for action in build_parser()._subparsers._group_actions  # type: ignore[union-attr]
    for name in getattr(action, "choices", {}) or {}
]


def test_help_lists_subcommands():
    assert {"import", "profile", "analyze", "place", "emulate", "fit", "classify"} <= set(
        SUBCOMMANDS
    )
    out = subprocess.run(
        [sys.executable, "-m", "scheduler", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    assert "usage: moe-scheduler " + name in capsys.readouterr().out


def _esft_fixture(path, model):
    rng = np.random.default_rng(0)
    ids = np.stack(
        [
            rng.permutation(model.num_experts)[: model.top_k]
            for _ in range(30 * model.num_moe_layers)
        ]
    )
    np.savez(
        path,
        expert_ids=ids.reshape(30, model.num_moe_layers, model.top_k).astype(np.int8),
        seq_offsets=np.arange(0, 31, 3, dtype=np.int32),
    )


def test_import_profile_analyze_pipeline(tmp_path, tiny_model, capsys):
    model_file = tmp_path / "model.json"
    model_file.write_text(json.dumps(tiny_model.to_dict()))
    _esft_fixture(tmp_path / "esft_a.npz", tiny_model)
    store = tmp_path / "store"
    assert (
        main(
            [
                "import",
                str(tmp_path / "esft_a.npz"),
                "--out",
                str(store),
                "--model",
                str(model_file),
            ]
        )
        == 0
    )
    assert "wrote 10 request records" in capsys.readouterr().out
    plain = tmp_path / "plain"
    assert (
        main(
            [
                "import",
                str(tmp_path / "esft_a.npz"),
                "--out",
                str(plain),
                "--model",
                str(model_file),
                "--no-compress",
            ]
        )
        == 0
    )
    assert [r.counts["prefill"].sum() for r in TraceSet(plain).records()] == [
        r.counts["prefill"].sum() for r in TraceSet(store).records()
    ]

    profile = tmp_path / "p.json"
    assert main(["profile", str(store), "--out", str(profile)]) == 0
    assert list(load_profile(profile).classes) == ["a"]
    assert main(["profile", "--check", str(profile)]) == 0

    report = tmp_path / "r" / "report.md"
    assert (
        main(
            [
                "analyze",
                str(store),
                str(profile),
                "--name",
                "traces",
                "--name",
                "prof",
                "--out",
                str(report),
            ]
        )
        == 0
    )
    text = report.read_text()
    assert "## traces" in text and "## prof" in text and "### Co-activation" in text
    assert (tmp_path / "r" / "report-figures" / "traces-heatmap-prefill.png").stat().st_size > 0


def test_cluster_profile_from_a_store(tmp_path, tiny_model):
    store = write_store(tmp_path / "s", tiny_model, labelled_records(tiny_model))
    out = tmp_path / "p.json"
    assert main(["profile", str(store), "--by", "cluster", "--k", "2", "--out", str(out)]) == 0
    assert sorted(load_profile(out).classes) == ["cluster-0", "cluster-1"]


@pytest.mark.parametrize(
    "make_input, argv_tail, message",
    [
        (
            lambda p: p.write_bytes(b"PK\x03\x04 truncated"),
            ["--model", "deepseek-v2-lite"],
            "not a readable .npz",
        ),
        (lambda p: p.write_text("{]"), [], "not valid JSON"),
    ],
    ids=["truncated-npz", "non-json"],
)
def test_bad_input_is_one_line_error_and_no_output(
    tmp_path, capsys, make_input, argv_tail, message
):
    suffix = ".npz" if "npz" in message else ".json"
    bad = tmp_path / f"bad{suffix}"
    make_input(bad)
    out = tmp_path / "p.json"
    code = main(["profile", str(bad), "--out", str(out), *argv_tail])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("moe-scheduler: error: ") and str(bad) in err[-1]
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    assert not out.exists()
    report = tmp_path / "a.md"
    assert main(["analyze", str(bad), "--out", str(report), *argv_tail]) == 2
    assert not report.exists() and not (tmp_path / "a-figures").exists()


def test_expert_id_out_of_range_via_cli(tmp_path, tiny_model, capsys):
    path = tmp_path / "esft_x.npz"
    ids = np.zeros((2, tiny_model.num_moe_layers, tiny_model.top_k), np.int8)
    ids[1, 2, 1] = 60
    np.savez(path, expert_ids=ids, seq_offsets=np.array([0, 2], np.int32))
    model_file = tmp_path / "m.json"
    model_file.write_text(json.dumps(tiny_model.to_dict()))
    assert (
        main(["import", str(path), "--out", str(tmp_path / "s"), "--model", str(model_file)]) == 2
    )
    assert "expert id 60 out of range [0, 8)" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_unknown_format_and_missing_path(tmp_path, capsys):
    odd = tmp_path / "x.bin"
    odd.write_bytes(b"\0")
    assert main(["profile", str(odd), "--out", str(tmp_path / "p.json")]) == 2
    assert "cannot tell the format" in capsys.readouterr().err
    assert main(["profile", str(tmp_path / "nope"), "--out", str(tmp_path / "p.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "dataset, classes",
    [
        ("esft-deepseek-v2-lite", ["intent", "law", "summary", "translation"]),
        ("sglang-deepseek-v3-eplb-stats", 8),
        ("mixtral-humaneval-gsm8k-small", ["code", "math"]),
    ],
)
def test_real_datasets_become_valid_profiles(shared_data, tmp_path, dataset, classes):
    out = tmp_path / "p.json"
    assert main(["profile", str(shared_data / "traces" / dataset), "--out", str(out)]) == 0
    profile = load_profile(out)
    names = list(profile.classes)
    assert names == classes if isinstance(classes, list) else len(names) == classes


def test_real_esft_analysis_and_clusters(shared_data, tmp_path):
    esft = shared_data / "traces" / "esft-deepseek-v2-lite"
    out = tmp_path / "p.json"
    assert main(["profile", str(esft), "--by", "cluster", "--k", "4", "--out", str(out)]) == 0
    assert len(load_profile(out).classes) == 4
    report = tmp_path / "esft.md"
    assert main(["analyze", str(esft), "--out", str(report)]) == 0
    text = report.read_text()
    assert "class-from-activation" not in text.lower() or "mean accuracy over layers" in text
    assert "Jensen-Shannon" in text and "Over 33279 tokens" in text
