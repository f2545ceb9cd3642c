import argparse
import json
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import pytest

from scheduler.cli import build_parser, main
from scheduler.profile import load_profile
from scheduler.traces.store import TraceSet
from tests.conftest import REPO, labelled_records, write_store


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subparsers of ``parser`` by name (empty when it has none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


TOP = build_parser()
PARSERS = _subcommands(TOP)
SUBCOMMANDS = list(PARSERS)
#: Where command lines are documented: the README, docs/ and deploy/.
DOCS = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted(REPO.glob("deploy/**/*.md")),
]


def _readme_synopses() -> list[list[str]]:
    """The words after ``moe-scheduler`` in the first cell of every row of README.md's
    "Commands" table (``\\|`` unescaped)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    cells = re.findall(r"^\| `moe-scheduler ([^`]*)` \|", section, re.MULTILINE)
    return [cell.replace("\\|", "|").split() for cell in cells]


def _flags(words: list[str]) -> list[tuple[str, bool]]:
    """(flag, shown as required: outside any ``[...]``) for every ``--flag`` in ``words``."""
    out, depth = [], 0
    for word in words:
        bare = word.lstrip("[")
        if bare.startswith("--"):
            out.append((bare.split("=")[0].rstrip("]"), depth == 0 and not word.startswith("[")))
        depth += word.count("[") - word.count("]")
    return out


def test_readme_command_table_matches_the_parser():
    """README.md's command table against the real parser: the same subcommands, every
    flag it shows exists on that subcommand, every option the parser requires is shown
    as required (outside brackets) in one of the subcommand's rows, and a subcommand
    with actions (client) lists exactly its actions."""
    rows = _readme_synopses()
    assert {words[0] for words in rows} == set(PARSERS)
    shown_required: dict[str, set[str]] = defaultdict(set)
    for name, *words in rows:
        options = PARSERS[name]._option_string_actions
        for flag, required in _flags(words):
            assert flag in set(options), (
                f"README shows `moe-scheduler {name} {flag}`: no such option"
            )
            if required:
                shown_required[name].add(flag)
        actions = _subcommands(PARSERS[name])
        if actions:
            listed = [w for w in words if not w.startswith("[") and "|" in w]
            assert [set(w.split("|")) for w in listed] == [set(actions)], name
    for name, parser in PARSERS.items():
        for action in parser._actions:
            if action.required and action.option_strings:
                assert set(action.option_strings) & shown_required[name], (
                    f"`moe-scheduler {name}` requires {action.option_strings[0]}; "
                    "README's command table does not show it"
                )


def _documented_command_lines(text: str) -> Iterator[str]:
    """Every ``moe-scheduler ...`` command in ``text``: in fenced code blocks (backslash
    continuations joined, comment lines skipped; at a line start or after ``&&``, ``|``,
    ``;``, ``$(``, optionally behind ``VAR=value`` and a path) and in inline code spans."""
    in_block, pending, prose = False, "", []
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            prose.append(line)
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.lstrip().startswith("#"):
            continue
        start = r"(?:^|&&|\|\||[;|]|\$\()\s*(?:[A-Za-z_]\w*=\S*\s+)*(?:\S*/)?moe-scheduler\s"
        for match in re.finditer(start, line):
            yield line[match.end() :]
    for span in re.findall(r"`moe-scheduler\s([^`]+)`", "\n".join(prose)):
        yield span.replace("\\|", "|")


def _command_words(rest: str) -> list[str]:
    """The words of one command, up to a shell separator, redirection or comment."""
    words = []
    for word in rest.split():
        if word[0] in "#>|;&" or word in ("2>&1", "||"):
            break
        words.append(word)
    return words


def _command_problems(words: list[str]) -> list[str]:
    """What the parser would reject in one documented command (``words`` after
    ``moe-scheduler``): an unknown subcommand or action, or a flag it does not take."""
    if words and words[0].startswith("-"):  # e.g. moe-scheduler --help
        return [f"no option {w}" for w in words if w not in TOP._option_string_actions]
    if not words or words[0] not in PARSERS:
        return ["no such subcommand"]
    parser, args = PARSERS[words[0]], words[1:]
    actions = _subcommands(parser)
    split = len(args)
    if actions:  # options before the action are the subcommand's, after it the action's
        at = [i for i, w in enumerate(args) if set(w.split("|")) <= set(actions)]
        if not at and not {"...", "--help"} & set(args):
            return ["no action"]
        split = at[0] if at else len(args)
    problems = []
    for i, word in enumerate(args):
        if word.startswith("--"):
            owners = [parser] if i < split else [actions[a] for a in args[split].split("|")]
            flag = word.split("=")[0]
            problems += [
                f"{owner.prog} has no {flag}"
                for owner in owners
                if flag not in owner._option_string_actions
            ]
    return problems


def test_documented_command_lines_use_real_subcommands_and_flags():
    """Every ``moe-scheduler`` command line in README.md, docs/ and deploy/ names a real
    subcommand (and, for client, a real action) and only flags it accepts, so a reader
    who copies one gets past the parser."""
    checked, problems = 0, []
    for path in DOCS:
        for rest in _documented_command_lines(path.read_text(encoding="utf-8")):
            words = _command_words(rest)
            where = f"{path.relative_to(REPO)}: moe-scheduler {' '.join(words)}"
            problems += [f"{where}: {problem}" for problem in _command_problems(words)]
            checked += 1
    assert not problems, "\n".join(problems)
    assert checked >= 100  # the scan found the documented commands (115 when written)


def test_help_lists_subcommands():
    """``python -m scheduler --help`` runs and names every subcommand README.md documents."""
    out = subprocess.run(
        [sys.executable, "-m", "scheduler", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for words in _readme_synopses():
        assert words[0] in out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help(name, capsys):
    """``--help`` of every subcommand exits 0 and its usage names every required option,
    each with a help line."""
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    usage, _, body = out.partition("\n\n")
    assert usage.startswith("usage: moe-scheduler " + name)
    for action in PARSERS[name]._actions:
        if action.required and action.option_strings:
            flag = action.option_strings[0]
            assert flag in usage, flag
            assert action.help and re.search(rf"^\s+{re.escape(flag)}\b", body, re.M), flag


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
