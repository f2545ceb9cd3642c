"""The SGLang version facts (scheduler/sglang_versions.py) against each checked version's
own argument table, and the commands sglang-args emits parsed against those tables.

tests/data/sglang_argparse/<version>.json records, for every flag sglang-args can emit,
whether that version's argparse accepts it, whether it takes a value, its choices and its
other spellings; each file's ``derived_from`` says how (derive.py beside them). Where the
installed sglang wheel's own parser can be imported, the 0.5.23 commands are also parsed
by it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scheduler.cli import main
from scheduler.deploy.sglang_args import (
    LAUNCH_PREFIX,
    MANAGED_FLAGS,
    SglangLaunch,
    all_node_argv,
)
from scheduler.errors import ConfigError
from scheduler.model_shape import PRESETS, ModelShape
from scheduler.placement.io import to_sglang
from scheduler.placement.placement import Placement
from scheduler.profile import ClassProfile, WorkloadProfile, save_profile
from scheduler.sglang_versions import (
    ATTN_DP_SIZE_SINCE,
    CHECKED_VERSIONS,
    DEFAULT_BOOTSTRAP_PORT,
    DISAGGREGATION_SINCE,
    MODEL_CLASSES,
    NEWEST_CHECKED,
    ROUTED_DP_RANK_SINCE,
    ROUTED_EXPERTS_SINCE,
    ROUTING_KEY_POLICY_SINCE,
    SglangVersion,
    check_expert_location,
    rank_field,
    sglang_model_class,
    supports_expert_location,
)

TABLES = Path(__file__).parent / "data" / "sglang_argparse"


def table(version: SglangVersion) -> dict[str, dict[str, Any]]:
    data = json.loads((TABLES / f"{version}.json").read_text(encoding="utf-8"))
    assert data["format"] == "moe-scheduler-sglang-argparse"
    assert data["sglang_version"] == str(version) and data["derived_from"].strip()
    flags: dict[str, dict[str, Any]] = data["flags"]
    return flags


def parse_against(argv: list[str], flags: dict[str, dict[str, Any]]) -> dict[str, str | None]:
    """Parse a launch command as ``flags`` (one version's argparse table) would: every
    flag known and accepted, a value exactly where one is taken, every choice valid, no
    flag twice (SGLang would silently keep the last). Returns flag -> value."""
    assert tuple(argv[: len(LAUNCH_PREFIX)]) == LAUNCH_PREFIX
    rest = argv[len(LAUNCH_PREFIX) :]
    parsed: dict[str, str | None] = {}
    i = 0
    while i < len(rest):
        flag, _, inline = rest[i].partition("=")
        assert flag.startswith("--"), f"stray argument {rest[i]!r}"
        assert flag in flags, f"{flag} is not in the table: add it to derive.py's FLAGS"
        spec = flags[flag]
        assert spec["accepted"], f"{flag} is not an argument of this version"
        assert flag not in parsed, f"{flag} given twice"
        value: str | None = None
        if spec["takes_value"]:
            if inline:
                value = inline
            else:
                i += 1
                assert i < len(rest) and not rest[i].startswith("--"), f"{flag} needs a value"
                value = rest[i]
            if "choices" in spec:
                assert value in spec["choices"], f"{flag} {value}: not in {spec['choices']}"
        else:
            assert not inline, f"{flag} takes no value"
        parsed[flag] = value
        i += 1
    return parsed


def launch(version: SglangVersion, nodes: int, gpus: int, **kw: Any) -> SglangLaunch:
    model = PRESETS["deepseek-v3"]
    return SglangLaunch(
        model_path="deepseek-ai/DeepSeek-V3",
        nodes=nodes,
        gpus_per_node=gpus,
        num_experts=model.num_experts,
        num_slots=model.num_experts + nodes * gpus,
        expert_location="/etc/moe-scheduler/placement/expert_location.json",
        version=version,
        dist_init_addr="10.0.0.1:5000" if nodes > 1 else None,
        model_name=model.name,
        **kw,
    )


#: Cluster shapes (nodes, GPUs per node) and extra arguments the commands are built with.
SHAPES = [(1, 8), (2, 8), (4, 2), (16, 8)]
EXTRAS: list[dict[str, Any]] = [
    {},
    {"api_key_env": "SGLANG_API_KEY", "extra_args": ("--enable-metrics",)},
    {"extra_args": ("--expert-distribution-recorder-mode", "per_token")},
    {"extra_args": ("--expert-distribution-recorder-mode=stat",)},
    {"disaggregation_mode": "prefill"},
    {"disaggregation_mode": "decode", "disaggregation_transfer_backend": "nixl"},
    {
        "disaggregation_mode": "prefill",
        "disaggregation_bootstrap_port": 9100,
        "disaggregation_transfer_backend": "mooncake",
        "api_key_env": "SGLANG_API_KEY",
    },
]


# ----------------------------------------------------------------------------- tables


def test_every_checked_version_has_a_table_and_nothing_else_does():
    assert sorted(p.stem for p in TABLES.glob("*.json")) == sorted(map(str, CHECKED_VERSIONS))
    assert list(CHECKED_VERSIONS) == sorted(CHECKED_VERSIONS)
    assert NEWEST_CHECKED == CHECKED_VERSIONS[-1] == SglangVersion.parse("0.5.23")


@pytest.mark.parametrize("version", CHECKED_VERSIONS, ids=str)
def test_the_version_constants_agree_with_each_versions_parser(version):
    flags = table(version)
    assert flags["--attn-dp-size"]["accepted"] == (version >= ATTN_DP_SIZE_SINCE)
    policies = flags["--schedule-policy"]["choices"]
    assert ("routing-key" in policies) == (version >= ROUTING_KEY_POLICY_SINCE)
    assert flags["--enable-return-routed-experts"]["accepted"] == (version >= ROUTED_EXPERTS_SINCE)
    # The old attention-DP spelling is still there in every checked version.
    assert flags["--enable-dp-attention"]["accepted"] and flags["--dp-size"]["accepted"]
    assert "deepep" in flags["--moe-a2a-backend"]["choices"]
    assert {"auto", "normal", "low_latency"} == set(flags["--deepep-mode"]["choices"])
    # PD disaggregation: in every checked version, with the modes and the backends the
    # tests pass (the transfer backend's other choices vary: fake from 0.5.6, mori from
    # 0.5.9, mooncake_tcp from 0.5.22; SGLang's own parser judges a passed-through name).
    assert version >= DISAGGREGATION_SINCE
    mode = flags["--disaggregation-mode"]
    assert mode["accepted"] and {"null", "prefill", "decode"} == set(mode["choices"])
    port = flags["--disaggregation-bootstrap-port"]
    assert port["accepted"] and port["takes_value"] and "choices" not in port
    backends = flags["--disaggregation-transfer-backend"]
    assert backends["accepted"] and {"mooncake", "nixl"} <= set(backends["choices"])


@pytest.mark.parametrize("version", CHECKED_VERSIONS, ids=str)
def test_every_spelling_of_a_managed_flag_is_managed(version):
    for flag, spec in table(version).items():
        if flag in MANAGED_FLAGS:
            assert set(spec.get("spellings", ())) <= MANAGED_FLAGS, flag


@pytest.mark.parametrize("version", CHECKED_VERSIONS, ids=str)
@pytest.mark.parametrize("nodes, gpus", SHAPES)
@pytest.mark.parametrize("extra", range(len(EXTRAS)))
def test_generated_commands_parse_with_that_versions_arguments(version, nodes, gpus, extra):
    flags = table(version)
    spec = launch(version, nodes, gpus, **EXTRAS[extra])
    commands = all_node_argv(spec)
    assert len(commands) == nodes
    for rank, argv in enumerate(commands):
        parsed = parse_against(argv, flags)
        assert parsed["--node-rank"] == str(rank)
        n = str(nodes * gpus)
        assert parsed["--tp-size"] == parsed["--ep-size"] == n
        if "--attn-dp-size" in parsed:
            assert parsed["--attn-dp-size"] == n
        else:
            assert parsed["--dp-size"] == n and "--enable-dp-attention" in parsed
        if "stat" in str(EXTRAS[extra].get("extra_args")):
            assert parsed["--deepep-mode"] == "normal"
        assert parsed.get("--disaggregation-mode") == EXTRAS[extra].get("disaggregation_mode")
        if EXTRAS[extra].get("disaggregation_mode") == "prefill":
            port = EXTRAS[extra].get("disaggregation_bootstrap_port", DEFAULT_BOOTSTRAP_PORT)
            assert parsed["--disaggregation-bootstrap-port"] == str(port)
        else:
            assert "--disaggregation-bootstrap-port" not in parsed


def test_pd_flags_are_refused_below_the_oldest_checked_version():
    older = SglangVersion.parse("0.4.10.post1")
    assert older < DISAGGREGATION_SINCE == CHECKED_VERSIONS[0]
    with pytest.raises(ConfigError, match="older than every version checked"):
        launch(older, 1, 8, disaggregation_mode="decode")
    assert launch(older, 1, 8).role == "mixed"  # a mixed instance is unaffected


def test_the_table_check_catches_what_an_old_parser_would_refuse():
    old = SglangVersion.parse("0.5.7")
    new_argv = all_node_argv(launch(NEWEST_CHECKED, 1, 8))[0]
    with pytest.raises(AssertionError, match="--attn-dp-size is not an argument"):
        parse_against(new_argv, table(old))
    old_argv = all_node_argv(launch(old, 1, 8))[0]
    parse_against(old_argv, table(old))
    with pytest.raises(AssertionError, match="--schedule-policy routing-key: not in"):
        parse_against([*old_argv, "--schedule-policy", "routing-key"], table(old))
    with pytest.raises(AssertionError, match="given twice"):
        parse_against([*old_argv, "--port", "1"], table(old))


# ----------------------------------------------------------------------------- SGLang's parser


@functools.cache
def _installed_sglang_parser() -> argparse.ArgumentParser | str:
    """SGLang's own parser, or why it is not available here: the installed wheel must be
    0.5.23 and its parser importable (it needs psutil, msgspec, zmq, triton, ... that a
    CPU-only venv may lack). Tried once: a failed import leaves ``sglang`` half-loaded."""
    try:
        installed = metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return "sglang is not installed"
    if installed != str(NEWEST_CHECKED):
        return f"the installed sglang is {installed}, not {NEWEST_CHECKED}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from sglang.srt.server_args import ServerArgs
    except Exception as e:  # ImportError mostly; any failure to import means: not here
        return f"sglang.srt.server_args cannot be imported here: {type(e).__name__}: {e}"
    parser = argparse.ArgumentParser(prog="sglang serve", exit_on_error=False)
    ServerArgs.add_cli_args(parser)
    return parser


@pytest.mark.parametrize("nodes, gpus", SHAPES[:3])
def test_0_5_23_commands_parse_with_the_installed_sglang_parser(nodes, gpus):
    parser = _installed_sglang_parser()
    if isinstance(parser, str):
        pytest.skip(parser)
    for extra in EXTRAS:
        for argv in all_node_argv(launch(NEWEST_CHECKED, nodes, gpus, **extra)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                args = parser.parse_args(argv[len(LAUNCH_PREFIX) :])
            assert args.tp_size == args.ep_size == args.attn_dp_size == nodes * gpus
            assert args.schedule_policy == "routing-key"
            assert args.ep_dispatch_algorithm == "static" and args.moe_a2a_backend == "deepep"
            assert args.enable_return_routed_experts is True
            if "stat" in str(extra.get("extra_args")):
                assert args.deepep_mode == "normal"
            mode = extra.get("disaggregation_mode")
            assert args.disaggregation_mode == (mode or "null")
            if mode == "prefill":
                port = extra.get("disaggregation_bootstrap_port", DEFAULT_BOOTSTRAP_PORT)
                assert args.disaggregation_bootstrap_port == port
            assert args.disaggregation_transfer_backend == extra.get(
                "disaggregation_transfer_backend", "mooncake"
            )


# ----------------------------------------------------------------------------- facts


@pytest.mark.parametrize(
    "version, field",
    [
        (None, "routed_dp_rank"),  # unknown: the newest checked
        ("0.5.23", "routed_dp_rank"),
        ("0.5.22", "routed_dp_rank"),
        ("0.5.20", "routed_dp_rank"),
        ("0.6.1", "routed_dp_rank"),  # newer than anything checked: the new name
        ("0.5.19", "data_parallel_rank"),  # between 0.5.9 and 0.5.20, unchecked: old name
        ("0.5.9", "data_parallel_rank"),
        ("0.5.6", "data_parallel_rank"),
        ("0.4.10.post2", "data_parallel_rank"),
    ],
)
def test_rank_field_by_version(version, field):
    assert rank_field(None if version is None else SglangVersion.parse(version)) == field
    assert SglangVersion.parse("0.5.20") == ROUTED_DP_RANK_SINCE


def test_version_errors_name_where_the_version_came_from():
    with pytest.raises(ConfigError, match=r"^--sglang-version 'five' is not a version"):
        SglangVersion.parse("five")
    with pytest.raises(ConfigError, match=r"^\[backend\] sglang_version 'x' is not a version"):
        SglangVersion.parse("x", what="[backend] sglang_version")


def test_every_preset_has_a_checked_sglang_class():
    assert set(MODEL_CLASSES) == set(PRESETS)
    for known in MODEL_CLASSES.values():
        assert known.source.startswith("python/sglang/srt/models/") and known.source.endswith(".py")


@pytest.mark.parametrize(
    "name, supported",
    [
        ("deepseek-v3", True),
        ("deepseek-v2-lite", True),
        ("qwen3-235b-a22b", True),
        ("DeepSeek-V3.1", True),  # the family, whatever the case
        ("DeepseekV3ForCausalLM", True),  # an HF architecture name
        ("mixtral-8x7b", False),
        ("Mixtral-8x22B-Instruct", False),
        ("MixtralForCausalLM", False),
        ("toy", None),
        ("qwen3-30b-a3b", None),  # not a preset: not claimed
    ],
)
def test_expert_location_support_by_model_name(name, supported):
    assert supports_expert_location(name) is supported
    if supported is None:
        assert sglang_model_class(name) is None
        warning = check_expert_location(name)
        assert warning is not None and f"{name!r} was not checked" in warning
    elif supported:
        assert check_expert_location(name) is None
    else:
        with pytest.raises(ConfigError) as refused:
            check_expert_location(name)
        message = str(refused.value)
        assert "\n" not in message
        assert "MixtralForCausalLM (python/sglang/srt/models/mixtral.py)" in message
        assert "no get_model_config_for_expert_location" in message
        assert "ignore --init-expert-location" in message
        assert "static dispatch would assert at the first forward pass" in message


# ----------------------------------------------------------------------------- place --check


def _placement_for(tmp_path: Path, model: ModelShape) -> list[str]:
    """A profile, topology and valid placement directory for ``model``: the arguments of
    ``place --check``."""
    rng = np.random.default_rng(0)
    counts = rng.gamma(2.0, 10.0, size=(model.num_moe_layers, model.num_experts)) + 1
    profile = WorkloadProfile(model, {"all": ClassProfile(weight=1.0, counts={"decode": counts})})
    save_profile(profile, tmp_path / "profile.json")
    (tmp_path / "t.toml").write_text("[cluster]\nnodes = 2\ngpus_per_node = 2\n")
    phy2log = np.tile(np.arange(model.num_experts), (model.num_moe_layers, 1))
    placement = Placement(phy2log, model.num_experts, 4, 2)
    (tmp_path / "p").mkdir()
    location = json.dumps(to_sglang(placement, model))
    (tmp_path / "p" / "expert_location.json").write_text(location)
    return ["place", "--profile", str(tmp_path / "profile.json"), "--topology"]


def test_place_check_refuses_mixtral_and_warns_about_unchecked_models(tmp_path, capsys):
    mixtral = PRESETS["mixtral-8x7b"]
    args = _placement_for(tmp_path, mixtral)
    args += [str(tmp_path / "t.toml"), "--check", str(tmp_path / "p")]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("moe-scheduler: error: model 'mixtral-8x7b' is served by SGLang's")
    assert "static dispatch would assert at the first forward pass" in err

    # The same shape under a name not in the table: checked, with a warning.
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    args = _placement_for(renamed, dataclasses.replace(mixtral, name="my-moe"))
    args += [str(renamed / "t.toml"), "--check", str(renamed / "p")]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "valid placement for my-moe" in out
    assert err.startswith("moe-scheduler: warning: model 'my-moe' was not checked")
